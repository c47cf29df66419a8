"""Adapter folders: every named adapter saved and restored, atomic saves (a writer killed at random
points leaves the old save or the new one), and folders whose files disagree refused naming the file."""
import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

import spectral_kernels as sk
import spectral_kernels.tuning.folder as folder
from spectral_kernels.tuning.folder import ADAPTER_NAME, CONFIG_NAME, HF_WEIGHTS_NAME, adapter_file_names
from spectral_kernels.tuning.safe_io import TEMP_MARK, AdapterFileError
from tests.tuning.models import tiny_bert, tokens

CFG = dict(target_modules=["query", "value"], rank=4, modules_to_save=["classifier"])


def _bank():
    """An adapted BERT with three adapters of distinct coefficients, "topic" active."""
    model = sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG))
    sk.add_adapter(model, "sentiment")
    sk.add_adapter(model, "topic")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sk.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.classifier.weight.add_(0.5)
    sk.set_adapter(model, "topic")
    return model


def _outputs(model):
    out = {}
    active = sk.active_adapter(model)
    with torch.no_grad():
        for name in sk.list_adapters(model):
            sk.set_adapter(model, name)
            out[name] = model(tokens()).logits
    sk.set_adapter(model, active)
    return out


def _coefficients(model):
    return {(n, a): layer.coefficients(a).detach().clone()
            for n, layer in sk.tuning.spectral_layers(model).items() for a in layer.adapter_names()}


@pytest.mark.parametrize("save", ["sk", "transformers"])
def test_every_adapter_and_the_active_one_are_saved_and_restored(tmp_path, save):
    model = _bank()
    if save == "sk":
        sk.save_pretrained(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)  # what Trainer calls
    assert {ADAPTER_NAME, "spectral_adapter.sentiment.safetensors", "spectral_adapter.topic.safetensors"} <= set(
        os.listdir(tmp_path))
    rebuilt = sk.from_pretrained(tiny_bert(), tmp_path)
    assert sk.list_adapters(rebuilt) == ["default", "sentiment", "topic"]
    assert sk.active_adapter(rebuilt) == "topic"
    want, got = _coefficients(model), _coefficients(rebuilt)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(rebuilt.classifier.weight, model.classifier.weight)
    want, got = _outputs(model), _outputs(rebuilt)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert sk.active_adapter(rebuilt) == "topic"
    held = torch.load(tmp_path / HF_WEIGHTS_NAME, weights_only=True)  # what Trainer's resume loads
    q = "bert.encoder.layer.0.attention.self.query"
    assert {f"{q}.coeffs", f"{q}.coeff_bank.sentiment", f"{q}.coeff_bank.topic"} <= set(held)


def test_trainer_resume_restores_inactive_adapters(tmp_path):
    """The checkpoint's pytorch_model.bin loads every adapter into a model with the same bank."""
    model = _bank()
    model.save_pretrained(tmp_path)
    twin = sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG))
    sk.add_adapter(twin, "sentiment")
    sk.add_adapter(twin, "topic")
    result = twin.load_state_dict(torch.load(tmp_path / HF_WEIGHTS_NAME, weights_only=True), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(twin._keys_to_ignore_on_save)  # only frozen base tensors are missing
    want, got = _coefficients(model), _coefficients(twin)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_deleted_adapter_leaves_the_folder_on_the_next_save(tmp_path):
    model = _bank()
    sk.save_pretrained(model, tmp_path)
    sk.set_adapter(model, "default")
    sk.delete_adapter(model, "sentiment")
    sk.save_pretrained(model, tmp_path)
    assert "spectral_adapter.sentiment.safetensors" not in os.listdir(tmp_path)
    rebuilt = sk.from_pretrained(tiny_bert(), tmp_path)
    assert sk.list_adapters(rebuilt) == ["default", "topic"] and sk.active_adapter(rebuilt) == "default"


def test_adapter_file_names():
    names = adapter_file_names(["default", "a-b_1", "x y", "z/w", "2"])
    assert names["default"] == ADAPTER_NAME and names["a-b_1"] == "spectral_adapter.a-b_1.safetensors"
    assert names["x y"] == "spectral_adapter.2.safetensors"  # by position: not a plain file name
    assert names["2"] == "spectral_adapter.2_.safetensors"  # no clash with it
    assert len(set(names.values())) == len(names)


# --- atomic saves -------------------------------------------------------------------------------------
def _set_generation(model, g):
    with torch.no_grad():
        for layer in sk.tuning.spectral_layers(model).values():
            for a in layer.adapter_names():
                layer.coefficients(a).fill_(g + (0.5 if a == "topic" else 0.0))
        model.classifier.weight.fill_(g)


def _generation(model):
    """The generation a loaded model holds; asserts that all its tensors hold the same one."""
    g = model.classifier.weight.flatten()[0].item()
    assert torch.all(model.classifier.weight == g)
    for layer in sk.tuning.spectral_layers(model).values():
        assert torch.all(layer.coefficients("default") == g)
        assert torch.all(layer.coefficients("topic") == g + 0.5)
    return g


def _bank_with_topic():
    model = sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG))
    sk.add_adapter(model, "topic")
    return model


def _save_loop(path, start, seed, conn):
    """The writer: saves generation after generation, reporting each completed one, until killed.
    os.fsync and os.replace sleep a little at random, to widen the windows between a save's steps."""
    rng = random.Random(seed)
    real_fsync, real_replace = os.fsync, os.replace

    def slow(f):
        def g(*a, **k):
            time.sleep(rng.random() * 0.004)
            return f(*a, **k)
        return g

    os.fsync, os.replace = slow(real_fsync), slow(real_replace)
    model = _bank_with_topic()
    g = start
    while True:
        _set_generation(model, g)
        model.save_pretrained(path)
        conn.send(g)
        g += 1


def test_a_writer_killed_mid_save_leaves_the_old_or_the_new_save(tmp_path):
    """SIGKILL a process that saves in a loop at random points: the folder always loads, to the
    last completed save or the one in flight, and its files agree with each other."""
    import multiprocessing

    # writers forked from a server that imported the package once (not from this process, whose
    # OpenMP threads a fork would leave locked): each starts in well under a second
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "spectral_kernels", __name__])
    path = str(tmp_path / "ckpt")
    rng = random.Random(0)
    start = 1
    for trial in range(6):
        recv, send = ctx.Pipe(duplex=False)
        writer = ctx.Process(target=_save_loop, args=(path, start, trial, send), daemon=True)
        writer.start()
        send.close()
        try:
            assert recv.poll(120), "the writer did not complete a first save"
            done = [recv.recv()]  # one complete save: from here on every save has a predecessor
            time.sleep(rng.random() * 0.5)
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
            while recv.poll():
                try:
                    done.append(recv.recv())
                except EOFError:
                    break
        finally:
            if writer.is_alive():
                writer.kill()
                writer.join()
        rebuilt = sk.from_pretrained(tiny_bert(), path)
        g = _generation(rebuilt)
        assert g in (done[-1], done[-1] + 1), (g, done[-1])  # the last completed save, or the one in flight
        assert sk.list_adapters(rebuilt) == ["default", "topic"]
        held = torch.load(os.path.join(path, HF_WEIGHTS_NAME), weights_only=True)  # Trainer's view agrees
        assert torch.all(held["classifier.weight"] == g)
        start = int(done[-1]) + 10


def _interrupted_save(directory, monkeypatch, call):
    """Save generation 1, then stop the save of generation 2 at its ``call``-th os.replace, as a
    kill at that point would. Returns the model (at generation 2)."""
    model = _bank_with_topic()
    _set_generation(model, 1)
    model.save_pretrained(directory)
    _set_generation(model, 2)
    real, count = os.replace, [0]

    def replace(src, dst):
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(folder.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(directory)
    return model


def test_killed_before_the_commit_leaves_the_previous_save(tmp_path, monkeypatch):
    model = _interrupted_save(tmp_path, monkeypatch, 1)  # the first rename is the commit
    assert _generation(sk.from_pretrained(tiny_bert(), tmp_path)) == 1
    # a kill leaves its temporaries: they are ignored, and the next save removes them
    leftover = tmp_path / f".{ADAPTER_NAME}{TEMP_MARK}0123456789ab"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 2 * 3600,) * 2)  # an hour old: no save in flight owns it
    assert _generation(sk.from_pretrained(tiny_bert(), tmp_path)) == 1
    for name in os.listdir(tmp_path):  # what the interrupted save left aside, an hour ago too
        if TEMP_MARK in name:
            os.utime(tmp_path / name, (time.time() - 2 * 3600,) * 2)
    model.save_pretrained(tmp_path)
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]
    assert _generation(sk.from_pretrained(tiny_bert(), tmp_path)) == 2


def test_killed_after_the_commit_loads_the_new_save_and_heals(tmp_path, monkeypatch):
    _interrupted_save(tmp_path, monkeypatch, 3)  # committed, one file renamed, the others still aside
    assert [n for n in os.listdir(tmp_path) if TEMP_MARK in n]
    assert _generation(sk.from_pretrained(tiny_bert(), tmp_path)) == 2
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]  # the renames were finished
    held = torch.load(tmp_path / HF_WEIGHTS_NAME, weights_only=True)
    assert torch.all(held["classifier.weight"] == 2)


def test_a_read_only_folder_killed_after_the_commit_is_read_where_it_lies(tmp_path, monkeypatch):
    _interrupted_save(tmp_path, monkeypatch, 3)

    def refuse(src, dst):
        raise PermissionError(13, "read-only file system", dst)

    with monkeypatch.context() as mp:
        mp.setattr(folder.os, "replace", refuse)
        assert _generation(sk.from_pretrained(tiny_bert(), tmp_path)) == 2  # from the files left aside
    assert [n for n in os.listdir(tmp_path) if TEMP_MARK in n]  # untouched


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    model = _bank_with_topic()
    _set_generation(model, 1)
    sk.save_adapter(model, tmp_path / "a.safetensors")
    _set_generation(model, 2)
    import spectral_kernels.tuning.safe_io as safe_io

    with monkeypatch.context() as mp:
        mp.setattr(safe_io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            sk.save_adapter(model, tmp_path / "a.safetensors")
    fresh = sk.load_adapter(tiny_bert(), tmp_path / "a.safetensors")
    assert torch.all(fresh.classifier.weight == 1)


# --- folders whose files disagree -------------------------------------------------------------------
@pytest.fixture
def two_saves(tmp_path):
    model = _bank_with_topic()
    _set_generation(model, 1)
    model.save_pretrained(tmp_path / "old")
    _set_generation(model, 2)
    model.save_pretrained(tmp_path / "new")
    return tmp_path / "old", tmp_path / "new"


@pytest.mark.parametrize("file", [ADAPTER_NAME, "spectral_adapter.topic.safetensors", HF_WEIGHTS_NAME])
def test_a_file_from_another_save_is_refused_naming_it(two_saves, file):
    old, new = two_saves
    shutil.copy(old / file, new / file)
    with pytest.raises(AdapterFileError, match=rf"{file} does not match the sha256 that spectral_config.json records"):
        sk.from_pretrained(tiny_bert(), new)


def test_a_missing_file_is_refused_naming_it(two_saves):
    _, new = two_saves
    os.remove(new / "spectral_adapter.topic.safetensors")
    with pytest.raises(AdapterFileError, match=r"spectral_adapter\.topic\.safetensors is missing"):
        sk.from_pretrained(tiny_bert(), new)


@pytest.mark.parametrize("content", [b"", b'{"format": "2", "files"'])
def test_a_torn_description_is_refused_naming_it(two_saves, content):
    _, new = two_saves
    (new / CONFIG_NAME).write_bytes(content)
    with pytest.raises(AdapterFileError, match=r"spectral_config\.json: cannot read this adapter folder description"):
        sk.from_pretrained(tiny_bert(), new)


def test_an_edited_description_is_refused(two_saves):
    _, new = two_saves
    desc = json.loads((new / CONFIG_NAME).read_text())
    desc["config"]["rank"] = 2
    (new / CONFIG_NAME).write_text(json.dumps(desc))
    with pytest.raises(AdapterFileError, match=r"spectral_config\.json: its config differs from the one in"):
        sk.from_pretrained(tiny_bert(), new)


def _as_format_1_folder(directory):
    desc = json.loads((directory / CONFIG_NAME).read_text())
    desc["format"] = "1"
    for key in ("files", "save_token", "adapters", "active_adapter"):
        desc.pop(key)
    (directory / CONFIG_NAME).write_text(json.dumps(desc))
    os.remove(directory / "spectral_adapter.topic.safetensors")
    held = torch.load(directory / HF_WEIGHTS_NAME, weights_only=True)  # version 1 wrote no bank
    torch.save({n: t for n, t in held.items() if "coeff_bank" not in n}, directory / HF_WEIGHTS_NAME)


def test_a_format_1_folder_loads_with_a_warning_and_its_bin_is_checked(two_saves):
    old, new = two_saves
    for d in (old, new):
        _as_format_1_folder(d)
    with pytest.warns(UserWarning, match="format 1"):
        assert _generation_default(sk.from_pretrained(tiny_bert(), new)) == 2
    shutil.copy(old / HF_WEIGHTS_NAME, new / HF_WEIGHTS_NAME)  # a new safetensors beside an old bin
    with pytest.warns(UserWarning), pytest.raises(AdapterFileError, match=r"pytorch_model\.bin: tensor '.*' differs "
                                                                         r"from the adapter files beside it"):
        sk.from_pretrained(tiny_bert(), new)


def _generation_default(model):
    g = model.classifier.weight.flatten()[0].item()
    assert all(torch.all(layer.coeffs == g) for layer in sk.tuning.spectral_layers(model).values())
    return g


def test_a_bank_is_checked_against_the_base_once(tmp_path, monkeypatch):
    """The other adapters' files of one save carry the default file's fingerprints: the base is hashed
    once per from_pretrained, not once per adapter."""
    import spectral_kernels.tuning.fingerprints as fps

    sk.save_pretrained(_bank(), tmp_path / "bank")
    sk.save_pretrained(sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG)), tmp_path / "one")
    hashed = []
    sha = fps._sha256
    monkeypatch.setattr(fps, "_sha256", lambda W: hashed.append(W.shape) or sha(W))
    sk.from_pretrained(tiny_bert(), tmp_path / "one")
    once = len(hashed)
    hashed.clear()
    sk.from_pretrained(tiny_bert(), tmp_path / "bank")
    assert once > 0 and len(hashed) == once
    with pytest.raises(sk.tuning.AdapterMismatchError):  # and a different base is still refused
        other = tiny_bert()
        with torch.no_grad():
            other.bert.embeddings.word_embeddings.weight.mul_(1.01)
        sk.from_pretrained(other, tmp_path / "bank")


def test_a_description_that_maps_an_adapter_to_another_file_is_refused(tmp_path):
    """Each adapter file records whose coefficients it holds: a description edited to swap two adapters'
    files (both files intact, of the same save) is refused naming the file, not loaded swapped."""
    sk.save_pretrained(_bank(), tmp_path)
    description = json.loads((tmp_path / CONFIG_NAME).read_text())
    files = description["adapters"]
    files["sentiment"], files["topic"] = files["topic"], files["sentiment"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(description))
    with pytest.raises(AdapterFileError, match=r"spectral_adapter\.(topic|sentiment)\.safetensors holds adapter "
                                               r"'(topic|sentiment)' but spectral_config\.json names it"):
        sk.from_pretrained(tiny_bert(), tmp_path)


def test_a_file_without_the_adapter_name_still_reads(tmp_path):
    """Files written before the adapter's name was recorded keep their metadata checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import spectral_kernels.tuning.adapter_io as aio

    sk.save_adapter(_bank(), tmp_path / "a.safetensors", adapter="sentiment")
    assert aio.read_adapter_file(tmp_path / "a.safetensors").adapter == "sentiment"
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta[aio.META_ADAPTER]
    meta[aio.META_CHECKSUM] = aio._metadata_checksum(meta)  # as such a file was written
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert aio.read_adapter_file(tmp_path / "old.safetensors").adapter is None
    meta[aio.META_ADAPTER] = "topic"  # an edited name breaks the checksum
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(AdapterFileError, match="does not match its checksum"):
        aio.read_adapter_file(tmp_path / "edited.safetensors")
