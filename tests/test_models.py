"""Model preparation that runs without the real offline models."""

import gguf
import numpy as np

from synthetic_instruction_tuner.models import one_gguf_parse


def _tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_gguf_parse_reads_a_file_once_and_restores_the_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    original = gguf.GGUFReader
    with one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling: not parsed again
        assert first.fields["llama.block_count"].parts[-1][0] == 1
        assert first.tensors[0].data.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
