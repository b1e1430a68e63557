"""Teacher options for speed: pure_bf16 (a keyed precision) and torch.compile (not keyed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_params

import cache_schema as cs
from pipeline.cache.reader import load_targets
from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig, load_params
from pipeline.evaluation.baselines import MaskCLIPSegmenter
from pipeline.clip.text import ClassEmbedder, template_set
from pipeline.teacher.run import run_teacher_cache


def tiny(**kw) -> Teacher:
    return Teacher.load(TeacherConfig(model="zeroseg-test-vit", pretrained="", device="cpu", **{"precision": "fp32", **kw}))


def test_pure_bf16_casts_the_image_tower_only_and_is_a_different_cache(tmp_path, demo_dir):
    fp32, pure = tiny(), tiny(precision="pure_bf16")
    assert {p.dtype for p in pure.model.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pure.model.transformer.parameters()} == {torch.float32}  # the text tower
    assert pure.identity.weights_sha256 == fp32.identity.weights_sha256  # hashed as loaded, before the cast
    x = torch.randn(12, 3, 32, 32)
    a, b = fp32.encode(x), pure.encode(x)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert F.cosine_similarity(a, b).min() > 0.99
    words = ClassEmbedder(fp32, tmp_path / "t1")(["cat", "dog"], template_set("single"))
    assert torch.equal(words, ClassEmbedder(pure, tmp_path / "t2")(["cat", "dog"], template_set("single")))
    seg = MaskCLIPSegmenter(pure, short_side=40)
    assert seg.dense_features(x[:2]).dtype == torch.float32  # the dense baseline feeds the bf16 tower too

    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1, 2]})
    plain = run_teacher_cache(load_params(params), str(tmp_path / "fp32.zarr"), progress=False)
    bf16 = run_teacher_cache(load_params(params, ["teacher.precision=pure_bf16"]), str(tmp_path / "pure.zarr"), progress=False)
    sa, sb = cs.validate(plain.store), cs.validate(bf16.store)
    assert sb["teacher"]["precision"] == "pure_bf16" and sa["fingerprint"] != sb["fingerprint"]
    ta, tb = (torch.from_numpy(load_targets(s, (1, 2)).astype(np.float32)) for s in (plain.store, bf16.store))
    assert F.cosine_similarity(ta, tb, dim=-1).min() > 0.99


@pytest.mark.slow
def test_compiled_teacher_encodes_what_the_eager_one_does():
    eager, compiled = tiny(), tiny(compile=True)
    assert compiled.identity == eager.identity  # compiling does not make another cache
    x = torch.randn(24, 3, 32, 32)
    torch.testing.assert_close(compiled.encode(x), eager.encode(x), atol=1e-5, rtol=1e-4)
    assert compiled.forward_views == 24


def test_a_local_dir_teacher_must_be_named_as_the_model_it_holds():
    from conftest import REPO

    from pipeline.core.errors import InputError

    folder = str(REPO / "assets" / "demo-teacher")
    teacher = Teacher.load(TeacherConfig(model="zeroseg-demo-rn", pretrained=folder, device="cpu"))
    assert teacher.identity.model == "zeroseg-demo-rn" and teacher.identity.embed_dim == 128
    # The folder's config builds the model: another name would be recorded as the cache's teacher.
    with pytest.raises(InputError, match=r"teacher.model: ViT-B-16 is not the model in .*demo-teacher \(its open_clip_config.json differs in embed_dim, text_cfg, vision_cfg\)"):
        Teacher.load(TeacherConfig(model="ViT-B-16", pretrained=folder, device="cpu"))
    with pytest.raises(InputError, match="'no-such-model' is not an open_clip model name"):
        Teacher.load(TeacherConfig(model="no-such-model", pretrained=folder, device="cpu"))
