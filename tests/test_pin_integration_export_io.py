"""The export's base read from a live UNet whose projections carry a fused tuner, and the file checks' messages
for a state dict (issue 18, mutation pins).

* ``export_lora(..., base=unet)``: a GLoRA delta depends on W0; read from a UNet where another tuner is fused into
  the same projections, the base must be W0 (the fused record), not the fused weight -- the export equals the one
  read from the clean base file.
* A state dict with a NaN or a huge value, loaded or hot-swapped: ``ResTunerFileError`` that names "the state dict"
  (there is no file to name) and the tensor, and nothing is loaded or changed; from a tuner file: its path.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import resattn_diffusion as rd
from resattn_diffusion.integration.export import export_lora
from resattn_diffusion.integration.io import tuner_state_dict
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner

GLORA = rd.ResTunerConfig(
    tuner="glora", targets=("attn1", "attn2"), config="A=lora2,B=lora2,C=lora2,D=vector,E=vector"
)
LORA = rd.ResTunerConfig(tuner="res_lora", rank=2, targets=("attn1", "attn2"))


def test_the_base_read_from_a_unet_with_a_fused_tuner_is_its_frozen_weight(tmp_path):
    unet = frozen_tiny_unet()
    clean = tmp_path / "base" / "diffusion_pytorch_model.safetensors"
    clean.parent.mkdir()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(clean))
    rd.add_res_tuner(unet, GLORA, "g")
    randomize_tuner(unet, "g", std=0.2)
    tuner_file = rd.save_res_tuner(unet, tmp_path / "g.safetensors", adapter_name="g")
    rd.add_res_tuner(unet, LORA, "other")
    randomize_tuner(unet, "other", seed=4, std=0.5)
    rd.fuse_res_tuner(unet, "other")  # the live weights are W0 + the other tuner's delta now

    from_unet = load_file(export_lora(tuner_file, tmp_path / "a.safetensors", base=unet).out_file)
    from_file = load_file(export_lora(tuner_file, tmp_path / "b.safetensors", base=clean.parent).out_file)
    assert from_unet.keys() == from_file.keys()
    for key, value in from_file.items():
        torch.testing.assert_close(from_unet[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    rd.unfuse_res_tuner(unet, "other")
    # the fused weight would have given another export: the check above is not vacuous
    linear = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    rd.fuse_res_tuner(unet, "other")
    fused_weight = linear.weight.detach().clone()
    rd.unfuse_res_tuner(unet, "other")
    assert not torch.allclose(fused_weight, linear.weight, atol=1e-3)


def _state_dict_with(unet, value: float) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {k: v.clone() for k, v in tuner_state_dict(unet, "default").items()}
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = value
    return tensors, key


@pytest.mark.parametrize("value,match", [(float("nan"), "holds NaN or inf"), (1e6, "holds values up to 1e\\+06")])
def test_a_bad_value_in_a_state_dict_names_the_state_dict_and_changes_nothing(tmp_path, value, match):
    source = frozen_tiny_unet()
    rd.add_res_tuner(source, LORA)
    randomize_tuner(source, std=0.2)
    tensors, key = _state_dict_with(source, value)

    unet = frozen_tiny_unet()
    with pytest.raises(rd.ResTunerFileError, match=rf"^'the state dict': tensor '{key}' {match}"):
        rd.load_res_tuner(unet, tensors, config=LORA)
    assert rd.get_res_tuner_configs(unet) == {}

    before = {k: v.clone() for k, v in tuner_state_dict(source, "default").items()}
    with pytest.raises(rd.ResTunerFileError, match=rf"^'the state dict': tensor '{key}' {match}"):
        rd.load_res_tuner(source, tensors, adapter_name="default", hotswap=True)
    after = tuner_state_dict(source, "default")
    assert all(torch.equal(after[k], v) for k, v in before.items())

    file = tmp_path / "bad.safetensors"
    rd.save_res_tuner(source, file)
    data = load_file(str(file))
    data[key].view(-1)[0] = value
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    save_file(data, str(file), metadata=metadata)
    with pytest.raises(rd.ResTunerFileError, match=rf"^'{file}': tensor '{key}' {match}"):
        rd.load_res_tuner(source, file, adapter_name="default", hotswap=True)
    after = tuner_state_dict(source, "default")
    assert all(torch.equal(after[k], v) for k, v in before.items())
