"""What loading checks: the base in every dtype pairing, the whole base (biases, embeddings, other
layers), damaged or edited adapter files, old files, and clear errors for a folder or a merged model."""
import base64
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import spectral_kernels as sk
import spectral_kernels.tuning.fingerprints as fps
from spectral_kernels.tuning import AdapterMismatchError, load_adapter, read_adapter, save_adapter
from spectral_kernels.tuning.safe_io import AdapterFileError
from tests.tuning.models import tiny_bert

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Net(nn.Module):
    """Odd sizes; two adapted layers with biases, a trained head, a frozen embedding and norm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 37)
        self.fc1 = nn.Linear(37, 53)
        self.norm = nn.LayerNorm(53)
        self.fc2 = nn.Linear(53, 53)
        self.head = nn.Linear(53, 7)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(self.emb(ids)))))))


CFG = dict(target_modules=["fc1", "fc2"], rank=5, modules_to_save=["head"])
IDS = torch.tensor([[1, 4, 9], [3, 0, 10]])


def net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():  # LayerNorm starts at ones/zeros: give it values a change can be seen in
        m.norm.weight.normal_(1.0, 0.1)
        m.norm.bias.normal_(0.0, 0.1)
    return m.to(dtype)


def trained(dtype=torch.float32, **cfg):
    m = sk.adapt(net(dtype=dtype), sk.SpectralConfig(**{**CFG, **cfg}))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _scaled(m, factor=1.01):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(factor)
    return m


def _row_changed(m):
    with torch.no_grad():
        m.fc2.weight[17].mul_(1.01)  # one row of an adapted weight, by 1 %
    return m


VARIANTS = {
    "scaled by 1.01": lambda dt: _scaled(net(), 1.01).to(dt),
    "another init": lambda dt: net(seed=1, dtype=dt),
    "one row changed": lambda dt: _row_changed(net()).to(dt),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter saved from the fp32, bf16 and fp16 base, by dtype."""
    out = {}
    for dt in DTYPES:
        path = tmp_path_factory.mktemp("a") / "a.safetensors"
        save_adapter(trained(dt), path)
        out[dt] = path
    return out


@pytest.mark.parametrize("save_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("load_dtype", DTYPES, ids=str)
def test_same_base_in_every_dtype_pairing_is_accepted(saved, save_dtype, load_dtype):
    m = load_adapter(net(dtype=load_dtype), saved[save_dtype])
    assert sk.tuning.spectral_layers(m)["fc1"].coeffs.dtype == load_dtype
    if save_dtype == load_dtype:  # the same model, bit for bit
        ref = trained(save_dtype)
        with torch.no_grad():
            torch.testing.assert_close(m(IDS), ref(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("save_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("load_dtype", DTYPES, ids=str)
def test_another_base_is_refused_in_every_dtype_pairing(saved, save_dtype, load_dtype, variant):
    other = VARIANTS[variant](load_dtype)
    with pytest.raises(AdapterMismatchError, match=r"layer 'fc[12]'|base parameter"):
        load_adapter(other, saved[save_dtype])
    assert not sk.tuning.spectral_layers(other)  # refused before anything changed


@pytest.mark.parametrize("load_dtype", DTYPES, ids=str)
def test_one_row_is_seen_across_dtypes_in_a_sampled_weight(tmp_path, monkeypatch, load_dtype):
    """A weight larger than the bf16 sample: every row is still sampled (53 rows, 64 entries)."""
    monkeypatch.setattr(fps, "CROSS_DTYPE_SAMPLE", 64)
    save_adapter(trained(), tmp_path / "a.safetensors")
    load_adapter(net(dtype=load_dtype), tmp_path / "a.safetensors")  # the same base passes
    for row in (0, 26, 52):
        other = net()
        with torch.no_grad():
            other.fc2.weight[row].mul_(1.01)
        with pytest.raises(AdapterMismatchError, match="layer 'fc2'"):
            load_adapter(other.to(load_dtype), tmp_path / "a.safetensors")


def test_the_hash_sample_of_a_large_weight_covers_every_row(monkeypatch):
    monkeypatch.setattr(fps, "FULL_HASH_NUMEL", 100)
    monkeypatch.setattr(fps, "SAMPLE_NUMEL", 60)
    W = torch.randn(53, 41)
    ref = fps.fingerprint(W)
    for row in range(53):
        V = W.clone()
        V[row] += 1e-3
        assert fps.fingerprint(V)["sha256"] != ref["sha256"], row
    rows, cols = fps.sample_positions(W.shape, 60)
    assert set(rows.tolist()) == set(range(53)) and len(set(cols.tolist())) > 40  # columns spread too


@pytest.mark.parametrize("shape", [(29, 31), (301, 67), (5003, 3), (17,)])
def test_fingerprints_in_every_pairing_of_four_dtypes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    other = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    one = W.clone()
    one.view(-1)[one.numel() // 2] *= 1.05  # one entry, 5 %: 13 ulps of bf16
    for a in DTYPES + [torch.float64]:
        stored = fps.fingerprint(W.to(a))
        for b in DTYPES + [torch.float64]:
            assert fps.compare_fingerprints(stored, fps.fingerprint(W.to(b))) is None, (a, b)
            for changed in (W * 1.01, other, one):
                if changed is one and a != b and W.numel() > fps.CROSS_DTYPE_SAMPLE:
                    continue  # one entry outside the bf16 sample: not seen across dtypes (documented)
                assert fps.compare_fingerprints(stored, fps.fingerprint(changed.to(b))) is not None, (a, b)


def test_fp16_subnormal_weights_are_the_same_base():
    W = torch.randn(29, 31) * 1e-5  # most entries under fp16's normal range (6.1e-5)
    for a in DTYPES:
        for b in DTYPES:
            assert fps.compare_fingerprints(fps.fingerprint(W.to(a)), fps.fingerprint(W.to(b))) is None, (a, b)
            assert fps.compare_fingerprints(fps.fingerprint(W.to(a)), fps.fingerprint((W * 1.05).to(b))) is not None


# --- item: the whole base ---------------------------------------------------------------------------
CHANGES = {  # (change, what the error names, dtypes it is visible in)
    "bias + 1": (lambda m: m.fc1.bias.add_(1.0), "base parameter 'fc1.bias'", DTYPES),
    "embedding x 2": (lambda m: m.emb.weight.mul_(2.0), "base parameter 'emb.weight'", DTYPES),
    "one norm entry + 5 %": (lambda m: m.norm.weight[3].mul_(1.05), "base parameter 'norm.weight'", DTYPES),
    # under bf16 rounding: seen in the same dtype only (docs/checks-on-load.md, "Not seen")
    "one norm entry + 1e-3": (lambda m: m.norm.weight[3].add_(1e-3), "base parameter 'norm.weight'", [torch.float32]),
}


@pytest.mark.parametrize("change, match, load_dtype", [
    (c, m, dt) for c, m, dts in CHANGES.values() for dt in dts], ids=[
    f"{k}-{dt}" for k, (_, _, dts) in CHANGES.items() for dt in dts])
def test_biases_and_layers_that_are_not_adapted_are_fingerprinted(tmp_path, change, match, load_dtype):
    save_adapter(trained(), tmp_path / "a.safetensors")
    other = net()
    with torch.no_grad():
        change(other)
    with pytest.raises(AdapterMismatchError, match=match):
        load_adapter(other.to(load_dtype), tmp_path / "a.safetensors")
    adapted = sk.adapt(other.to(load_dtype), sk.SpectralConfig(**CFG))  # also into an adapted model
    with pytest.raises(AdapterMismatchError, match=match):
        load_adapter(adapted, tmp_path / "a.safetensors")


def test_trained_bias_and_head_are_not_part_of_the_base(tmp_path):
    m = trained(train_bias=True)
    save_adapter(m, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        base = json.loads(f.metadata()["spectral_kernels.base"])
    assert "fc1.bias" not in base and "head.weight" not in base  # trained: held in the file instead
    assert {"emb.weight", "norm.weight", "norm.bias"} <= set(base)
    other = net()
    with torch.no_grad():
        other.fc1.bias.add_(1.0)
        other.head.weight.mul_(3.0)
    loaded = load_adapter(other, tmp_path / "a.safetensors")  # both are replaced by the file's
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), m(IDS))


def test_embeddings_of_a_transformers_model(tmp_path):
    model = sk.adapt(tiny_bert(), sk.SpectralConfig(target_modules=["query", "value"], rank=4,
                                                     modules_to_save=["classifier"]))
    save_adapter(model, tmp_path / "a.safetensors")
    other = tiny_bert()
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.mul_(2.0)
    with pytest.raises(AdapterMismatchError, match=r"base parameter 'bert\.embeddings\.word_embeddings\.weight'"):
        load_adapter(other, tmp_path / "a.safetensors")
    load_adapter(tiny_bert().half(), tmp_path / "a.safetensors")


# --- item: damaged and edited files ------------------------------------------------------------------
def _rewrite(path, *, tensors=None, meta=None):
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    if tensors:
        tensors(t)
    if meta:
        meta(md)
    save_file(t, str(path), metadata=md)


def _flip_byte(path, tensor):
    """Flip the top byte of the first entry of ``tensor`` in place (the file's header says where it is)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0]
    raw[start + 3] ^= 0x7F
    path.write_bytes(bytes(raw))


@pytest.fixture
def adapter(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained(), path)
    return path


def test_flipped_bytes_are_refused_naming_the_file_and_tensor(adapter):
    _flip_byte(adapter, "fc1.coeffs")
    with pytest.raises(AdapterFileError, match=r"a\.safetensors: tensor 'fc1\.coeffs' does not match its sha256"):
        load_adapter(net(), adapter)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, value):
    m = trained()
    with torch.no_grad():
        m.fc2.coeffs[2] = value
    save_adapter(m, tmp_path / "a.safetensors")
    with pytest.raises(AdapterFileError, match=r"tensor 'fc2\.coeffs' holds 1 non-finite values"):
        read_adapter(tmp_path / "a.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_a_tensor_of_another_dtype_is_refused_not_cast(adapter, dtype):
    _rewrite(adapter, tensors=lambda t: t.update({"fc1.coeffs": t["fc1.coeffs"].to(dtype)}))
    with pytest.raises(AdapterFileError, match=r"tensor 'fc1\.coeffs' is \w+ \[5\] in the file but was saved as "
                                                r"float32 \[5\]: refused rather than cast"):
        load_adapter(net(), adapter)


@pytest.mark.parametrize("key, edit", [
    ("spectral_kernels.config", lambda c: {**c, "mode": "shift"}),
    ("spectral_kernels.config", lambda c: {**c, "form": "pure"}),
    ("spectral_kernels.layers", lambda ls: {n: {**lm, "rank": 4} for n, lm in ls.items()}),
])
def test_edited_metadata_is_refused(adapter, key, edit):
    _rewrite(adapter, meta=lambda md: md.update({key: json.dumps(edit(json.loads(md[key])))}))
    with pytest.raises(AdapterFileError, match="does not match its checksum"):
        load_adapter(net(), adapter)


@pytest.mark.parametrize("edit, match", [
    (lambda c: {**c, "mode": "shift"}, r"layer 'fc1' was saved with mode='scale' but the file's config gives mode='shift'"),
    (lambda c: {**c, "form": "pure"}, r"layer 'fc1' was saved with form='delta' but the file's config gives form='pure'"),
    (lambda c: {**c, "rank": 3}, r"layer 'fc1' was saved with rank=5 but the file's config gives rank=3"),
])
def test_config_and_layer_metadata_are_cross_checked(adapter, edit, match):
    """An edit that also recomputes the metadata checksum is still refused: the layers disagree."""
    from spectral_kernels.tuning.adapter_io import META_CHECKSUM, _metadata_checksum

    def change(md):
        md["spectral_kernels.config"] = json.dumps(edit(json.loads(md["spectral_kernels.config"])))
        md[META_CHECKSUM] = _metadata_checksum(md)

    _rewrite(adapter, meta=change)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(net(), adapter)


def test_truncated_file_is_refused_naming_it(adapter):
    adapter.write_bytes(adapter.read_bytes()[:-7])
    with pytest.raises(AdapterFileError, match=r"a\.safetensors: cannot read this adapter file"):
        load_adapter(net(), adapter)


def _as_format_1(path):
    """Rewrite a file the way version 1 wrote it: no checksums, no base, fingerprints without samples."""
    def meta(md):
        layers = json.loads(md["spectral_kernels.layers"])
        for lm in layers.values():
            for k in ("version", "bf16", "bf16_sample"):
                lm["fingerprint"].pop(k)
        md.update({"spectral_kernels.format": "1", "spectral_kernels.layers": json.dumps(layers)})
        for k in ("spectral_kernels.base", "spectral_kernels.tensors", "spectral_kernels.checksum"):
            md.pop(k)
    _rewrite(path, meta=meta)


def test_a_format_1_file_still_loads_with_a_warning(adapter):
    want = trained()
    _as_format_1(adapter)
    with pytest.warns(UserWarning, match="format 1 .* no checksums"):
        m = load_adapter(net(), adapter)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), want(IDS), rtol=0, atol=0)
    with pytest.warns(UserWarning), pytest.raises(AdapterMismatchError, match="layer 'fc1'"):
        load_adapter(net(seed=1), adapter)
    _rewrite(adapter, tensors=lambda t: t["fc1.coeffs"].__setitem__(0, float("nan")))
    with pytest.warns(UserWarning), pytest.raises(AdapterFileError, match="non-finite"):
        load_adapter(net(), adapter)


def test_bf16_sample_is_what_the_docs_say(adapter):
    with safe_open(str(adapter), framework="pt") as f:
        layers = json.loads(f.metadata()["spectral_kernels.layers"])
    sample = torch.frombuffer(bytearray(base64.b64decode(layers["fc1"]["fingerprint"]["bf16"])), dtype=torch.bfloat16)
    assert torch.equal(sample, net().fc1.weight.detach().to(torch.bfloat16).reshape(-1))  # 53·37 < 4096: every entry


# --- item: clear errors -------------------------------------------------------------------------------
def test_load_adapter_on_a_folder_says_to_use_from_pretrained(tmp_path):
    sk.save_pretrained(trained(), tmp_path / "run")
    with pytest.raises(IsADirectoryError, match=r"is a folder, not an adapter file: load an adapter folder with "
                                                r"spectral_kernels\.from_pretrained\(model, folder\).*spectral_adapter"):
        load_adapter(net(), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(net(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("save", [lambda m, p: save_adapter(m, p / "a.safetensors"), lambda m, p: sk.save_pretrained(m, p)])
def test_saving_a_merged_model_says_it_is_merged(tmp_path, save):
    m = sk.merge_adapter(trained())
    with pytest.raises(ValueError, match=r"the model is merged \(merge_adapter\).*spectral_kernels\.unmerge\(model\)"):
        save(m, tmp_path)
    sk.unmerge(m)
    save(m, tmp_path)


def test_no_warning_for_a_current_file(adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(net(), adapter)


def test_saved_fingerprints_are_reused_until_the_tensor_changes():
    W = torch.randn(23, 19)
    a = fps.saved_fingerprint(W)
    assert fps.saved_fingerprint(W) == a  # reused
    with torch.no_grad():
        W[4, 4] += 1.0  # an in-place change bumps the version counter
    assert fps.saved_fingerprint(W)["sha256"] == fps.fingerprint(W)["sha256"] != a["sha256"]


@pytest.mark.parametrize("shape", [(29, 31), (301, 67), (17,)])
def test_check_fingerprint_agrees_with_the_full_comparison(shape, monkeypatch):
    """check_fingerprint computes less than fingerprint + compare_fingerprints, never decides otherwise:
    every dtype pairing, the same base and three other ones, a version-1 fingerprint of a sampled tensor."""
    monkeypatch.setattr(fps, "FULL_HASH_NUMEL", 400)  # (301, 67) is hashed on a sample
    monkeypatch.setattr(fps, "SAMPLE_NUMEL", 300)
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    one = W.clone()
    one.view(-1)[one.numel() // 3] *= 1.05
    for a in DTYPES + [torch.float64]:
        stored = fps.fingerprint(W.to(a))
        v1 = {k: v for k, v in stored.items() if k not in ("version", "bf16", "bf16_sample")}
        v1["sha256"] = "0" * 64  # another sample's hash: version 1 falls back on the sums
        for fp in (stored, v1):
            for b in DTYPES + [torch.float64]:
                for X in (W, W * 1.01, torch.randn(shape, generator=g, dtype=torch.float64) * 0.05, one):
                    full = fps.compare_fingerprints(fp, fps.fingerprint(X.to(b)), what="w")
                    assert fps.check_fingerprint(fp, X.to(b), what="w") == full, (a, b, fp is v1)
        assert fps.check_fingerprint(stored, W.to(a)) is None
        assert "shape" in fps.check_fingerprint(stored, torch.zeros(3, 5, dtype=a))


@pytest.mark.parametrize("load_dtype", DTYPES, ids=str)
def test_loading_in_the_saved_dtype_only_hashes_the_base(tmp_path, monkeypatch, load_dtype):
    """The float64 sums and the bf16 sample are computed on load only across dtypes."""
    save_adapter(trained(torch.float32), tmp_path / "a.safetensors")
    calls = []
    full = fps.fingerprint
    monkeypatch.setattr(fps, "fingerprint", lambda W, **kw: calls.append(W.shape) or full(W, **kw))
    load_adapter(net(dtype=load_dtype), tmp_path / "a.safetensors")
    n_base = sum(1 for _ in net().parameters()) - 2  # every parameter but the head's two (trained)
    assert len(calls) == (0 if load_dtype == torch.float32 else n_base)
    calls.clear()
    with pytest.raises(AdapterMismatchError, match=r"norm [0-9.]+ vs"):  # a refusal still names the norms
        load_adapter(_scaled(net()), tmp_path / "a.safetensors")
