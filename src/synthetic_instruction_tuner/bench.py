"""Benchmarks that print ratios measured side by side in one run (not tests).

python -m synthetic_instruction_tuner.bench generation --profile cpu
    one prompt at a time with plain `generate` (the seed's fallback) vs the batched engine,
    same model, precision, sampling settings, stop tokens and number of outputs.
python -m synthetic_instruction_tuner.bench scoring --profile cpu --task mmlu
    lm-eval's own `hf` model vs step 07's (the output layer on scored positions only) on the base
    model and the shipped benchmark copies, as the profile samples them: seconds and log-likelihoods.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .config import load_config
from .errors import PipelineError


def _real_tokens(row: list[int], prompt_len: int, stop: set[int]) -> int:
    """Generated tokens up to and including the first stop token (padding after it is not work)."""
    new = row[prompt_len:]
    for i, token in enumerate(new):
        if token in stop:
            return i + 1
    return len(new)


def bench_generation(profile: str, overrides: list[str], num_outputs: int | None) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from .engines import load_engine
    from .generation import Request
    from .magpie import pre_query_ids
    from .models import resolve_device

    cfg = load_config(profile, overrides)
    device = resolve_device(cfg.hardware.device)
    engine = load_engine(cfg, device)
    engine.show_progress = False
    n = num_outputs or 2 * cfg.engine.batch_size
    sampling = cfg.magpie.sampling
    prompt = pre_query_ids(engine.tokenizer, cfg.models.generator)
    stop = set(engine.stop_ids)
    print(
        f"model {cfg.models.generator} ({cfg.hardware.generation_dtype}, {device}), workload: step 01 Magpie, "
        f"{n} outputs, max_new_tokens={sampling.max_new_tokens}, T={sampling.temperature}, top_k={sampling.top_k}",
        flush=True,
    )

    # The seed's fallback: one prompt per generate() call, transformers' own sampler and cache.
    torch.manual_seed(cfg.seed)
    ids = torch.tensor([prompt], device=engine.model.device)
    tokens, started = 0, time.perf_counter()
    for _ in tqdm(range(n), desc="one at a time", unit="seq"):
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=engine.stop_ids,
                pad_token_id=engine.pad_id,
            )
        tokens += _real_tokens(out[0].tolist(), len(prompt), stop)
    single_s = time.perf_counter() - started
    single = {
        "outputs": n,
        "tokens": tokens,
        "seconds": round(single_s, 1),
        "tokens_per_s": tokens / single_s,
    }

    requests = [Request(f"b{i:05d}", prompt, sampling) for i in range(n)]
    stats = engine.run(requests, lambda batch: None, desc="batched")
    batched = {
        "outputs": stats.completions,
        "tokens": stats.new_tokens,
        "seconds": round(stats.seconds, 1),
        "tokens_per_s": stats.tokens_per_second,
        "batch_size": stats.batch_size,
    }
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    print(
        f"one prompt at a time: {single['tokens_per_s']:8.1f} tokens/s  ({tokens} tokens in {single_s:.1f} s)"
    )
    print(
        f"batched engine (bs {stats.batch_size}): {batched['tokens_per_s']:8.1f} tokens/s  "
        f"({stats.new_tokens} tokens in {stats.seconds:.1f} s)"
    )
    print(f"speed-up: {ratio:.1f}x")
    return {"single": single, "batched": batched, "ratio": ratio}


def _sft_worker(
    profile: str, overrides: list[str], run_dir: str | None, which: str, steps: int
) -> dict[str, Any]:
    """Train `steps` optimizer steps of LoRA SFT with one configuration; runs in its own process."""
    import resource

    from trl import SFTConfig, SFTTrainer

    from .models import resolve_model
    from .steps import start_step
    from .training import (
        chat_tokenizer,
        load_target,
        lora_config,
        sft_config,
        sft_splits,
        skip_adapter_input_casts,
        use_dense_lm_head,
    )

    ctx = start_step(profile, run_dir, overrides)
    cfg = ctx.cfg
    train, evaluation = sft_splits(ctx.paths, cfg)
    train, evaluation = train.remove_columns("id"), evaluation.remove_columns("id")
    out = ctx.paths.root / "bench" / which
    if which == "ours":
        args = sft_config(cfg, out, ctx.device)
        args.max_steps, args.save_strategy, args.eval_strategy, args.logging_steps = steps, "no", "no", 1
    else:
        s = cfg.sft
        args = SFTConfig(  # TRL's defaults, but for what defines the method and the comparison
            output_dir=str(out),
            max_steps=steps,
            learning_rate=s.learning_rate,
            lr_scheduler_type=s.lr_scheduler_type,
            warmup_steps=s.warmup_ratio,
            max_grad_norm=s.max_grad_norm,
            seed=cfg.seed,
            data_seed=cfg.seed,
            per_device_train_batch_size=s.per_device_train_batch_size,
            gradient_accumulation_steps=s.gradient_accumulation_steps,
            assistant_only_loss=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=ctx.device == "cpu",
            bf16=ctx.device != "cpu" and cfg.hardware.dtype == "bfloat16",
        )
    trainer = SFTTrainer(
        model=load_target(cfg, ctx.device),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=chat_tokenizer(resolve_model(cfg.models.target).path),
        peft_config=lora_config(cfg),
    )
    if which == "ours":
        skip_adapter_input_casts(trainer, cfg, ctx.device)
        if cfg.hardware.dense_lm_head:
            use_dense_lm_head(trainer)
    result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        "config": which,
        "gradient_checkpointing": args.gradient_checkpointing,
        "padding_free": args.padding_free,
        "sampling": str(getattr(args, "train_sampling_strategy", "random")),
        "dense_lm_head": which == "ours" and cfg.hardware.dense_lm_head,
        "optim": str(args.optim),
        "max_length": args.max_length,
        "samples_per_second": result.metrics["train_samples_per_second"],
        "train_seconds": result.metrics["train_runtime"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_loss": eval_loss,
    }


def bench_sft(
    profile: str, overrides: list[str], run_dir: str | None, steps: int, variant: list[str] | None = None
) -> dict[str, Any]:
    """TRL's defaults vs the profile's SFT setup (and optionally the setup with `variant` settings on top),
    same data and steps, each trained in its own process so that peak memory is its own."""
    import json
    import subprocess

    configs = [("trl", "trl", overrides), ("ours", "ours", overrides)]
    if variant:
        configs.append(("ours+" + ",".join(variant), "ours", overrides + variant))
    results: dict[str, Any] = {}
    for label, which, sets in configs:
        cmd = [sys.executable, "-m", "synthetic_instruction_tuner.bench", "_sft_worker", "--profile", profile]
        cmd += ["--which", which, "--steps", str(steps)]
        cmd += [a for o in sets for a in ("--set", o)] + (["--run-dir", run_dir] if run_dir else [])
        print(f"training {steps} steps with the {label} configuration ...", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PipelineError(
                f"sft benchmark worker ({label}) failed: {done.stderr.strip().splitlines()[-1]}"
            )
        results[label] = {**json.loads(done.stdout.strip().splitlines()[-1]), "config": label}
    trl = results["trl"]
    for row in results.values():
        print(
            f"{row['config']}: {row['samples_per_second']:6.2f} samples/s  peak RSS {row['peak_rss_mb']:7.0f} MB  "
            f"eval loss {row['eval_loss']:.4f}  (gradient checkpointing {row['gradient_checkpointing']}, padding-free "
            f"{row['padding_free']}, sampling {row['sampling']}, dense LM head {row['dense_lm_head']}, "
            f"optim {row['optim']})"
        )
    for label, row in results.items():
        if label != "trl":
            print(
                f"{label} / TRL defaults: speed {row['samples_per_second'] / trl['samples_per_second']:.2f}x, "
                f"peak memory {row['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x, "
                f"eval loss {row['eval_loss'] / trl['eval_loss']:.3f}x"
            )
    return results


def _score(lm: Any, task: str, cfg: Any, manager: Any) -> tuple[float, list[float], list[float]]:
    """(seconds, every response's log-likelihood in document order, each document's accuracy)."""
    import lm_eval

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=cfg.evaluation.mmlu_fewshot if task == "mmlu" else None,
        log_samples=True,
        apply_chat_template=True,
        fewshot_as_multiturn=task == "mmlu",
        task_manager=manager,
        bootstrap_iters=0,
        random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    seconds = time.perf_counter() - started
    rows = sorted(
        ((name, row["doc_id"], row) for name, rows in out["samples"].items() for row in rows),
        key=lambda item: item[:2],
    )
    logliks = [float(resp[0][0]) for _, _, row in rows for resp in row["resps"]]
    return seconds, logliks, [float(row["acc"]) for _, _, row in rows]


def bench_scoring(profile: str, overrides: list[str], task: str) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .evaluation import _adapter_lm_class
    from .models import resolve_device
    from .offline_tasks import write_offline_tasks
    from .store import run_paths
    from .training import load_for_generation

    cfg = load_config(profile, [*overrides, "evaluation.mode=local"])
    device = resolve_device(cfg.hardware.device)
    tasks_dir = Path(tempfile.mkdtemp(prefix="sit-bench-scoring-"))
    docs = write_offline_tasks(cfg, tasks_dir, [task])[task]
    manager = TaskManager(include_path=str(tasks_dir))
    model, tokenizer = load_for_generation(cfg, run_paths(tasks_dir / "run"), "base", device)
    print(f"model {cfg.models.target} ({cfg.hardware.generation_dtype}, {device}); {task}: {docs} documents")
    results: dict[str, Any] = {}
    for label, cls in (("lm-eval hf", HFLM), ("step 07", _adapter_lm_class())):
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=1)
        with torch.inference_mode():
            results[label] = _score(lm, task, cfg, manager)
        seconds, _, accs = results[label]
        print(f"{label}: {seconds:.1f} s, accuracy {sum(accs) / len(accs):.3f}", flush=True)
    (base_s, base_ll, base_accs), (ours_s, ours_ll, ours_accs) = results.values()
    differences = sorted(abs(a - b) for a, b in zip(base_ll, ours_ll, strict=True))
    largest, median = differences[-1], differences[len(differences) // 2]
    changed = sum(a != b for a, b in zip(base_accs, ours_accs, strict=True))
    base_acc, ours_acc = sum(base_accs) / len(base_accs), sum(ours_accs) / len(ours_accs)
    print(
        f"step 07 / lm-eval hf: speed {base_s / ours_s:.2f}x on {len(base_ll)} log-likelihoods; "
        f"difference median {median:.2e}, largest {largest:.2e} nats; {changed} of {len(base_accs)} "
        f"documents scored differently; accuracy {ours_acc:.3f} vs {base_acc:.3f}"
    )
    return {"speedup": base_s / ours_s, "largest_difference": largest, "accuracy": (base_acc, ours_acc)}


def bench_answering(profile: str, overrides: list[str], task: str) -> dict[str, Any]:
    """lm-eval's ``hf`` model against step 07's on a generation benchmark, the same greedy requests:
    seconds, how many answers are identical, and prompt-level strict accuracy of each."""
    import tempfile
    from pathlib import Path

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .evaluation import _adapter_lm_class, _gen_kwargs, prepare_local_tasks
    from .models import resolve_device
    from .offline_tasks import write_offline_tasks
    from .store import read_jsonl, run_paths
    from .training import load_for_generation

    cfg = load_config(profile, [*overrides, "evaluation.mode=local"])
    device = resolve_device(cfg.hardware.device)
    paths = run_paths(Path(tempfile.mkdtemp(prefix="sit-bench-answering-")))
    if task == "ifeval":
        tasks_dir = paths.eval / "tasks"
        docs = write_offline_tasks(cfg, tasks_dir, [task])[task]
    else:  # the project's IFBench task; this run has no held-out prompts of its own
        paths.file("heldout.jsonl").parent.mkdir(parents=True, exist_ok=True)
        paths.file("heldout.jsonl").write_text("")
        tasks_dir = prepare_local_tasks(cfg, paths)
        docs = len(read_jsonl(tasks_dir / "data" / "ifbench.jsonl"))
    manager = TaskManager(include_path=str(tasks_dir))
    model, tokenizer = load_for_generation(cfg, paths, "base", device)
    batch = cfg.evaluation.batch_size
    print(
        f"model {cfg.models.target} ({cfg.hardware.generation_dtype}, {device}); {task}: {docs} prompts, batch {batch}"
    )
    results: dict[str, tuple[float, list[str], float]] = {}
    for label, cls in (("lm-eval hf", HFLM), ("step 07", _adapter_lm_class())):
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch)
        started = time.perf_counter()
        with torch.inference_mode():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                log_samples=True,
                gen_kwargs=_gen_kwargs(cfg, task),
                apply_chat_template=True,
                task_manager=manager,
                bootstrap_iters=0,
                random_seed=cfg.seed,
            )
        seconds = time.perf_counter() - started
        rows = sorted(out["samples"][task], key=lambda row: row["doc_id"])
        accuracy = sum(row["prompt_level_strict_acc"] for row in rows) / len(rows)
        results[label] = (seconds, [row["resps"][0][0] for row in rows], accuracy)
        print(f"{label}: {seconds:.1f} s, prompt strict {accuracy:.3f}", flush=True)
    (base_s, base_text, base_acc), (ours_s, ours_text, ours_acc) = results.values()
    same = sum(a == b for a, b in zip(base_text, ours_text, strict=True))
    print(
        f"step 07 / lm-eval hf: speed {base_s / ours_s:.2f}x on {len(base_text)} prompts; "
        f"{same} answers identical; prompt strict {ours_acc:.3f} vs {base_acc:.3f}"
    )
    return {"speedup": base_s / ours_s, "identical": same, "accuracy": (base_acc, ours_acc)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthetic_instruction_tuner.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generation", help="batched engine vs one prompt at a time")
    gen.add_argument("--profile", default="cpu")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    gen.add_argument("--num-outputs", type=int, default=None, help="default: two engine batches")
    scoring = sub.add_parser("scoring", help="lm-eval's hf model vs step 07's on a log-likelihood benchmark")
    scoring.add_argument("--profile", default="cpu")
    scoring.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    scoring.add_argument("--task", default="mmlu", choices=("mmlu", "truthfulqa_mc2", "hellaswag"))
    answering = sub.add_parser("answering", help="lm-eval's hf model vs step 07's on a generation benchmark")
    answering.add_argument("--profile", default="cpu")
    answering.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    answering.add_argument("--task", default="sit_ifbench", choices=("ifeval", "sit_ifbench"))
    for name in ("sft", "_sft_worker"):
        sft = sub.add_parser(
            name, help="the project's SFT setup vs TRL's defaults" if name == "sft" else None
        )
        sft.add_argument("--profile", default="cpu")
        sft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        sft.add_argument(
            "--run-dir", default=None, help="a run whose steps 03-04 are done (default: runs/<profile>)"
        )
        sft.add_argument("--steps", type=int, default=12)
        sft.add_argument(
            "--variant",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="also train the project's setup with these settings on top (a third configuration)",
        )
        if name == "_sft_worker":
            sft.add_argument("--which", choices=("ours", "trl"), required=True)
    args = parser.parse_args(argv)
    try:
        if args.what == "generation":
            bench_generation(args.profile, args.overrides, args.num_outputs)
        elif args.what == "scoring":
            bench_scoring(args.profile, args.overrides, args.task)
        elif args.what == "answering":
            bench_answering(args.profile, args.overrides, args.task)
        elif args.what == "sft":
            bench_sft(args.profile, args.overrides, args.run_dir, args.steps, args.variant)
        elif args.what == "_sft_worker":
            import json

            print(json.dumps(_sft_worker(args.profile, args.overrides, args.run_dir, args.which, args.steps)))
    except PipelineError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
