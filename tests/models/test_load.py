import pytest
import torch

from qviz.models import ModelNotAvailableError, load_model


def test_missing_model_offline_says_so_and_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(
        ModelNotAvailableError, match=r"no-such-org/no-such-model.*not in the local cache.*download"
    ):
        load_model("no-such-org/no-such-model")


def test_unknown_architecture_from_a_local_dir(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    from qviz.models import get_adapter

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(NotImplementedError, match="supported model types"):
        get_adapter(model)


def test_local_directory_round_trip(tmp_path):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(
        models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]")
    )
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
