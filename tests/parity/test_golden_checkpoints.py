"""The tiny-checkpoint builder reproduces the golden checkpoints byte for byte (assets/golden/checkpoints.json)."""

from __future__ import annotations

import json

import pytest

from golden_checkpoints import DIGESTS, VARIANTS, build_checkpoint, file_digests, unpack_tokenizer

RECORDED = json.loads(DIGESTS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return unpack_tokenizer(tmp_path_factory.mktemp("golden") / "tokenizer")


def test_unpacked_tokenizer_matches_recorded_digests(tokenizer_dir):
    assert file_digests(tokenizer_dir) == RECORDED["tokenizer"]


def test_every_recorded_variant_is_built():
    assert set(VARIANTS) == set(RECORDED["variants"])
    assert {v: VARIANTS[v].seed for v in VARIANTS} == {v: r["seed"] for v, r in RECORDED["variants"].items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_files_match_recorded_digests(variant, tokenizer_dir, tmp_path):
    got = file_digests(build_checkpoint(variant, tmp_path / variant, tokenizer_dir))
    expected = RECORDED["variants"][variant]["sha256"]
    assert sorted(got) == sorted(expected)
    assert [p for p in expected if got[p] != expected[p]] == []
