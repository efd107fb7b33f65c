"""Fuzzed adapter files (reliability campaign, category "files").

Every damaged folder must give a clear ``AdapterFileError`` (or a ``ValueError`` / ``TypeError``
naming the argument, for a path argument that leaves the folder), quickly and without a large
allocation, with nothing unpickled, and with the model as it was: same logits, the failed adapter
not registered, the active adapter unchanged. A damage that leaves the adapter intact (a bit
flipped in a recorded name, an extra file) may load, and then must load exactly. A failed
``save_pretrained`` leaves the old files intact and no temporary file behind.

Symlinks are followed (the Hub cache is made of them) if they end at a regular file; a symlink
to a directory, device or pipe is refused without blocking. The cases are seeded: a failure
prints its case, and rerunning gives the same case."""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import pickle
import random
import resource
import shutil
import struct
import time

import pytest
import torch

from para_kernels import AdapterFileError, PARAConfig, PARAModel, get_para_model
from para_kernels.transformers import io as para_io

from kit.models import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_params,
    logits_of,
    randomize_adapter,
    tiny_llama,
    token_ids,
)

SOURCES = {
    "plain": {},
    "rich": dict(pooler="attn", activation="rational", targets=("q", "up"), layers_to_transform=[1],
                 modules_to_save=["lm_head"]),
}
SLOW_S = 2.0  # a refusal takes milliseconds; this bounds one case, hangs included
RSS_GROWTH_MB = 64  # peak RSS growth the whole campaign may cause (a 2^28-float tensor alone is 1 GiB)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(autouse=True)
def _nothing_unpickled(monkeypatch):
    """No torch.load / pickle anywhere on a load's path."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled while loading an adapter")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    monkeypatch.setattr(torch, "load", refuse)
    faulthandler.dump_traceback_later(120, exit=True)  # a load that blocks (a pipe) fails the run, not hangs it
    yield
    faulthandler.cancel_dump_traceback_later()


class Bench:
    """One wrapped tiny model, the saved sources, their reference logits, and the checks every
    case ends with."""

    def __init__(self, root):
        self.root = root
        self.sources, self.ref = {}, {}
        for name, config in SOURCES.items():
            pm = get_para_model(tiny_llama(), PARAConfig(r=4, **config))
            randomize_adapter(pm, seed=len(name))
            if "modules_to_save" in config:
                with torch.no_grad():
                    pm.saved_modules["default"]["lm_head"].weight.mul_(1.5)
            folder = root / "sources" / name
            pm.save_pretrained(str(folder))
            self.sources[name] = folder
        self.pm = get_para_model(tiny_llama(), PARAConfig(r=4))
        randomize_adapter(self.pm, seed=7)
        for name, folder in self.sources.items():
            self.pm.load_adapter(str(folder), adapter_name="new")
            self.pm.set_adapter("new")
            self.ref[name] = logits_of(self.pm)
            self.pm.set_adapter("default")
            self.pm.delete_adapter("new")
        self.base = logits_of(self.pm)
        self.bare = tiny_llama()
        with torch.no_grad():
            self.bare_logits = self.bare(input_ids=token_ids()).logits
        self.rss0 = _maxrss_mb()
        self.n = 0

    def copy(self, source: str = "plain", name: str | None = None):
        self.n += 1
        folder = self.root / "cases" / (name or f"case{self.n}")
        shutil.copytree(self.sources[source], folder, symlinks=True)
        return folder

    def unchanged(self, what: str) -> None:
        pm = self.pm
        assert list(pm.peft_config) == ["default"] and pm.active_adapter == "default", what
        assert not adapter_params(pm, "new") and "new" not in pm.saved_modules, what
        assert torch.equal(logits_of(pm), self.base), what

    def outcome(self, folder, what: str, source: str = "plain", errors=(AdapterFileError,), **kwargs) -> str:
        """Load ``folder`` as 'new': either refused with one of ``errors`` (the model unchanged)
        or loaded exactly (its logits equal the source's); returns 'refused' or 'loaded'."""
        start = time.perf_counter()
        try:
            self.pm.load_adapter(str(folder), adapter_name=kwargs.pop("adapter_name", "new"), **kwargs)
        except errors as e:
            assert str(e), what
            result = "refused"
        else:
            config, saved = self.pm.peft_config["new"], PARAConfig.from_pretrained(str(self.sources[source]))
            where = dict(init_scale=saved.init_scale, layers_path=saved.layers_path,
                         target_modules=saved.target_modules)
            assert dataclasses.replace(config, **where) == saved, f"{what}: loaded another config"
            self.pm.set_adapter("new")
            assert torch.equal(logits_of(self.pm), self.ref[source]), f"{what}: loaded, but not the saved adapter"
            self.pm.set_adapter("default")
            self.pm.delete_adapter("new")
            result = "loaded"
        elapsed = time.perf_counter() - start
        assert elapsed < SLOW_S, f"{what}: took {elapsed:.1f} s"
        assert _maxrss_mb() - self.rss0 < RSS_GROWTH_MB, f"{what}: peak RSS grew by {_maxrss_mb() - self.rss0:.0f} MB"
        self.unchanged(what)
        return result

    def refused(self, folder, what: str, **kwargs) -> None:
        assert self.outcome(folder, what, **kwargs) == "refused", f"{what}: loaded"

    def bare_refused(self, folder, what: str) -> None:
        """PARAModel.from_pretrained on a bare backbone refuses ``folder`` and leaves the backbone
        as it was: no generator, hook or forward override left, the same logits."""
        model = self.bare
        with pytest.raises(AdapterFileError):
            PARAModel.from_pretrained(model, str(folder))
        for name, m in model.named_modules():
            assert not hasattr(m, "para_generator") and "forward" not in m.__dict__, f"{what}: {name} changed"
            assert not (m._forward_hooks or m._forward_pre_hooks), f"{what}: hooks left on {name}"
        with torch.no_grad():
            assert torch.equal(model(input_ids=token_ids()).logits, self.bare_logits), what


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("files"))


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header_text: str, data: bytes, length: int | None = None) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


# ---------------------------------------------------------------- bytes
def test_truncated_and_bit_flipped_files(bench, campaign):
    """Random truncations, bit flips, zeroed and random runs of bytes in either file."""
    rng = random.Random(1)
    counts = {"refused": 0, "loaded": 0}
    for i in range(campaign.cases(200)):
        source = rng.choice(list(SOURCES))
        folder = bench.copy(source)
        path = folder / rng.choice([ADAPTER_WEIGHTS, ADAPTER_CONFIG])
        data = bytearray(path.read_bytes())
        mode = rng.choice(["truncate", "flip", "flip", "zero", "random"])
        if mode == "truncate":
            data = data[:rng.randrange(len(data))]
        elif mode == "flip":
            for _ in range(rng.choice([1, 1, 2, 3])):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.randint(1, 64))
            data[start:end] = bytes(end - start) if mode == "zero" else rng.randbytes(end - start)
        path.write_bytes(bytes(data))
        what = f"case {i}: {mode} {path.name} of {source}"
        result = bench.outcome(folder, what, source)
        if result == "refused" and i % 5 == 0:
            bench.bare_refused(folder, what)
        counts[result] += 1
    campaign.tried("files", sum(counts.values()))
    assert counts["refused"] > counts["loaded"]


# ---------------------------------------------------------------- lying safetensors headers
def _huge(path, header: dict, data: bytes, key: str, n: int = 2 ** 28) -> None:
    """Rewrite ``path`` as a valid safetensors file in which tensor ``key`` (new or not) has ``n``
    float32s, backed by a sparse stretch of file (it reads as zeros): only its name or shape can
    give it away, and reading it allocates 4 n bytes."""
    kept, offset = b"", 0
    entries = sorted((k, e) for k, e in header.items() if k not in ("__metadata__", key))
    for _, entry in entries:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = [offset, offset + b - a]
        kept, offset = kept + data[a:b], offset + b - a
    header[key] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
    _write(path, json.dumps(header), kept)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + 4 * n)


def _lie(rng, header: dict, data: bytes, path) -> str:
    """Rewrite ``path`` with a header that lies in one way; returns what was done."""
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    kind = rng.choice(["dtype", "shape", "huge shape", "offsets", "duplicate", "extra huge", "sparse huge",
                       "metadata", "length", "not an object", "deep", "not utf-8"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X99", "", 5, None])
    elif kind == "shape":
        lies = [[], [0], [-1, 4], [4.0], ["4"], list(reversed(entry["shape"])), [d + 1 for d in entry["shape"]],
                None, 4]
        entry["shape"] = rng.choice([lie for lie in lies if lie != entry["shape"]])  # a 1-D shape reversed is itself
    elif kind == "huge shape":
        entry["shape"] = rng.choice([[2 ** 40], [2 ** 20, 2 ** 20], [2 ** 63], [2 ** 64], [2 ** 31, 2 ** 31, 4]])
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        lies = [[b, a], [a, b + 4], [a, 2 ** 40], [0, b - a], [a, None], [a - 4, b - 4] if a else [4, b], [a], None,
                [-4, b], [2 ** 64, 2 ** 64 + b - a]]
        entry["data_offsets"] = rng.choice([lie for lie in lies if lie != [a, b]])
    elif kind == "duplicate":
        text = json.dumps(header)
        twin = dict(entry) if rng.random() < 0.5 else dict(entry, shape=[1])
        _write(path, text[:-1] + f", {json.dumps(key)}: {json.dumps(twin)}}}", data)
        return f"{kind} {key}"
    elif kind in ("extra huge", "sparse huge"):
        # an unexpected tensor, or an expected one, declared huge in a valid file
        _huge(path, header, data, f"{key}.extra" if kind == "extra huge" else key)
        return f"{kind} {key}"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([None, [], {"sha256": 5}, {"para_format": "x", "sha256": "0"},
                                             "text", {"format": "pt"}])
    elif kind == "length":
        text = json.dumps(header)
        _write(path, text, data, length=rng.choice([0, 1, len(text) - 1, len(text) + 1, 2 ** 40, 2 ** 64 - 1]))
        return f"{kind}"
    elif kind == "not an object":
        _write(path, json.dumps(rng.choice([keys, 5, "x", None])), data)
        return kind
    elif kind == "deep":
        depth = rng.choice([10_000, 200_000])
        _write(path, "[" * depth + "]" * depth, data)
        return f"{kind} {depth}"
    else:
        raw = b"\xff\xfe" + json.dumps(header).encode()[2:]
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return kind
    _write(path, json.dumps(header), data)
    return f"{kind} {key}"


def test_lying_safetensors_headers(bench, campaign):
    """Headers that lie about dtypes, shapes (2^40 elements and more), data offsets and their own
    length, duplicate keys, unexpected tensors backed by gigabytes of sparse file: refused from the
    header, before any tensor is read."""
    rng = random.Random(2)
    n = campaign.cases(100)
    for i in range(n):
        folder = bench.copy()
        path = folder / ADAPTER_WEIGHTS
        header, data = _header(path)
        what = _lie(rng, header, data, path)
        bench.refused(folder, f"case {i}: {what}")
        if i % 5 == 0:
            bench.bare_refused(folder, f"case {i}: {what}")
    campaign.tried("files", n)


def test_weights_swapped_after_their_header_was_read(bench, campaign, monkeypatch):
    """A weights file replaced (by a huge one) between the header check and the read: the shapes
    are checked again on the file safetensors opened, before any tensor is read."""
    folder = bench.copy()
    path = folder / ADAPTER_WEIGHTS
    checked = para_io.read_header(str(path))
    header, data = _header(path)
    key = next(k for k in header if k != "__metadata__")
    _huge(path, header, data, key)
    monkeypatch.setattr(para_io, "read_header", lambda weights_path: checked)
    bench.refused(folder, "swapped weights")
    campaign.tried("files", 1)


# ---------------------------------------------------------------- adapter_config.json
# the JSON type of each field of a saved config (pinned here: the file format is a contract)
_STR, _INT, _NUM, _NULL, _LIST, _OBJ, _BOOL = "str", "int", "num", "null", "list", "obj", "bool"
JSON_TYPES = {
    "r": {_INT}, "pooler": {_STR}, "activation": {_STR}, "targets": {_LIST, _STR}, "target_modules": {_NULL, _OBJ},
    "pool_input": {_STR}, "layers_to_transform": {_NULL, _LIST, _INT}, "layers_path": {_NULL, _STR},
    "init_scale": {_NUM, _INT}, "modules_to_save": {_NULL, _LIST, _STR}, "base_model_name_or_path": {_NULL, _STR},
    "revision": {_NULL, _STR}, "task_type": {_NULL, _STR}, "inference_mode": {_BOOL}, "model_type": {_NULL, _STR},
    "hidden_size": {_NULL, _INT}, "num_layers": {_NULL, _INT}, "generator_outputs": {_NULL, _INT},
    "para_kernels_version": {_NULL, _STR},
}


def _json_type(value) -> str:
    if value is None or isinstance(value, bool):
        return _NULL if value is None else _BOOL
    for kind, t in ((_INT, int), (_NUM, float), (_STR, str), (_LIST, list), (_OBJ, dict)):
        if isinstance(value, t):
            return kind
    raise TypeError(value)


WRONG_VALUES = ["4", 4.5, True, False, None, -1, 0, 2 ** 40, 2 ** 70, [], [4], {}, {"r": 4}, "", "../x", "/etc/passwd",
                "sum", "swish", "nope", ["q", "q"], ["k"], {"q": 1}, [True], [-1], [0, 99], 1e308, -0.0]
FIELDS = list(JSON_TYPES) + ["peft_type", "format", "lora_alpha", "subfolder", "config", ""]


def test_config_fields_fuzzed(bench, campaign):
    """Every config field (and unknown ones) set to wrong types and invalid values: a clear
    AdapterFileError naming the file, or (a value that is valid and changes nothing: a recorded
    name, null for a default) an exact load of the same config."""
    rng = random.Random(3)
    n = campaign.cases(150)
    for i in range(n):
        source = rng.choice(list(SOURCES))
        folder = bench.copy(source)
        path = folder / ADAPTER_CONFIG
        doc = json.loads(path.read_text())
        field, value = rng.choice(FIELDS), rng.choice(WRONG_VALUES)
        doc[field] = value
        path.write_text(json.dumps(doc))
        what = f"case {i}: {field}={value!r} in {source}"
        if bench.outcome(folder, what, source) == "loaded":  # then the value was of the field's type
            assert _json_type(value) in JSON_TYPES.get(field, ()), f"{what}: a value of the wrong type was loaded"
    campaign.tried("files", n)


CONFIG_TEXTS = {
    "duplicate key": lambda t: t.replace('"r": 4', '"r": 4, "r": 4'),
    "duplicate key, other value": lambda t: t.replace('"r": 4', '"r": 4, "r": 8'),
    "NaN": lambda t: t.replace('"init_scale": 1.0', '"init_scale": NaN'),
    "Infinity": lambda t: t.replace('"init_scale": 1.0', '"init_scale": Infinity'),
    "huge number": lambda t: t.replace('"init_scale": 1.0', '"init_scale": 1e999'),
    "BOM": lambda t: "\ufeff" + t,
    "latin-1": lambda t: t.replace('"revision": null', '"revision": "\xe9"').encode("latin-1"),
    "deep nesting": lambda t: t.replace('"revision": null', '"revision": ' + "[" * 100_000 + "]" * 100_000),
    "over 1 MiB": lambda t: t[:-2] + " " * (1 << 20) + t[-2:],
    "empty": lambda t: "",
    "whitespace": lambda t: "  \n",
    "null": lambda t: "null",
    "two documents": lambda t: t + t,
}


@pytest.mark.parametrize("name", list(CONFIG_TEXTS))
def test_config_texts(bench, campaign, name):
    folder = bench.copy()
    path = folder / ADAPTER_CONFIG
    text = CONFIG_TEXTS[name](path.read_text())
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    bench.refused(folder, name)
    campaign.tried("files")


# ---------------------------------------------------------------- paths, symlinks, special files
ESCAPING_NAMES = ["../outside", "..", ".", "/abs", "a/b", "a\\..\\b", "", "..\\outside", "x/../../outside"]
ESCAPING_SUBFOLDERS = ["../outside", "/abs", "a/../../outside", "..", "sub/../../outside", "\\abs"]


def test_paths_that_escape_the_folder(bench, campaign, tmp_path):
    """adapter_name / subfolder that would leave the folder are refused, naming the argument,
    before anything is read: next to the folder lies an adapter whose config is not JSON, so a
    read of it would raise another error."""
    inner = tmp_path / "inner"
    shutil.copytree(bench.sources["plain"], tmp_path / "outside")
    (tmp_path / "outside" / ADAPTER_CONFIG).write_text("{not json")
    (tmp_path / ADAPTER_CONFIG).write_text("{not json")  # for '..'
    shutil.copytree(bench.sources["plain"], inner / "sub" / "deeper")
    bench.n += 1
    cases = [("adapter_name", v) for v in ESCAPING_NAMES + [str(tmp_path / "outside"), 5, None]] + \
            [("subfolder", v) for v in ESCAPING_SUBFOLDERS + [str(tmp_path / "outside"), 5]]
    for arg, value in cases:
        what = f"{arg}={value!r}"
        with pytest.raises((ValueError, TypeError)) as info:
            bench.pm.load_adapter(str(inner), **{"adapter_name": "new", arg: value})
        assert arg in str(info.value), what
        bench.unchanged(what)
        if arg == "subfolder" and isinstance(value, str):
            with pytest.raises((ValueError, TypeError), match="subfolder"):
                PARAConfig.from_pretrained(str(inner), subfolder=value)
    # a nested subfolder that stays inside is fine
    assert bench.outcome(inner, "nested subfolder", subfolder="sub/deeper") == "loaded"
    campaign.tried("files", len(cases) + 1)


def _special(kind, tmp_path, target):
    """Make ``target`` (a file of a copied folder) into ``kind``."""
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    if kind == "directory":
        target.mkdir()
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "link to fifo":
        fifo = tmp_path / f"fifo{time.perf_counter_ns()}"
        os.mkfifo(fifo)
        target.symlink_to(fifo)
    elif kind == "link to /dev/zero":
        target.symlink_to("/dev/zero")
    elif kind == "link to /dev/urandom":
        target.symlink_to("/dev/urandom")
    elif kind == "link to directory":
        target.symlink_to(tmp_path)
    elif kind == "dangling link":
        target.symlink_to(tmp_path / "nothing here")
    elif kind == "link loop":
        target.symlink_to(target)
    else:
        raise KeyError(kind)


SPECIAL = ["directory", "empty", "fifo", "link to fifo", "link to /dev/zero", "link to /dev/urandom",
           "link to directory", "dangling link", "link loop"]


@pytest.mark.parametrize("file", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
def test_special_files(bench, campaign, tmp_path, file):
    """A directory, an empty file, a pipe, a device, a dangling or looping symlink where a file
    should be: refused at once (a pipe or /dev/zero is never read from)."""
    for kind in SPECIAL:
        folder = bench.copy()
        _special(kind, tmp_path, folder / file)
        bench.refused(folder, f"{file} is a {kind}")
        bench.bare_refused(folder, f"{file} is a {kind}")
    campaign.tried("files", len(SPECIAL))


def test_symlinks_to_regular_files_are_followed(bench, campaign, tmp_path):
    """The documented choice: a symlink to a regular file outside the folder is followed (the Hub
    cache is symlinks into its blobs folder); what it holds is checked as any file is."""
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        folder = bench.copy()
        outside = tmp_path / f"blob-{file}"
        shutil.move(folder / file, outside)
        (folder / file).symlink_to(os.path.relpath(outside, folder))
        assert bench.outcome(folder, f"{file} linked outside") == "loaded"
    campaign.tried("files", 2)


def test_extra_files_are_ignored(bench, campaign):
    """Extra files (a pickle an attacker left beside the adapter, other frameworks' files, hidden
    temporaries, subfolders) are never read: the adapter loads exactly."""
    rng = random.Random(4)
    names = ["adapter_model.bin", "pytorch_model.bin", "model.safetensors", "README.md", ".para_tmp.x.json",
             "adapter_config.json.bak", "training_args.bin", "tokenizer.json", "sub/adapter_config.json"]
    n = campaign.cases(20)
    for i in range(n):
        folder = bench.copy()
        for name in rng.sample(names, rng.randint(1, 4)):
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(pickle.dumps({"x": 1}) if name.endswith(".bin") else rng.randbytes(64))
        assert bench.outcome(folder, f"case {i}") == "loaded"
    campaign.tried("files", n)


SWAPS = {"pooler": ["mean", "max"], "activation": ["relu", "silu", "tanh", "identity"], "pool_input": ["normed"],
         "modules_to_save": [["model.norm"]]}


def test_config_edited_to_another_valid_value(bench, campaign):
    """A config edited (or bit-flipped) to another valid setting that needs the same tensors would
    load the weights into another computation: refused, the weights carry their config's checksum.
    Where the modules are (layers_path) and init_scale may be edited."""
    n = 0
    for field, values in SWAPS.items():
        for value in values:
            folder = bench.copy()
            doc = json.loads((folder / ADAPTER_CONFIG).read_text())
            doc[field] = value
            (folder / ADAPTER_CONFIG).write_text(json.dumps(doc))
            bench.refused(folder, f"{field}={value!r}")
            n += 1
    for field, value in (("layers_path", "model.layers"), ("init_scale", 0.5)):
        folder = bench.copy()
        doc = json.loads((folder / ADAPTER_CONFIG).read_text())
        doc[field] = value
        (folder / ADAPTER_CONFIG).write_text(json.dumps(doc))
        assert bench.outcome(folder, f"{field}={value!r}") == "loaded"
        n += 1
    campaign.tried("files", n)


def test_huge_r_fails_before_allocating(bench, campaign):
    """r of 2^40 (or a shape product past 2^63) in the config: refused from the expected shapes,
    nothing allocated."""
    for r in (2 ** 31, 2 ** 40, 2 ** 62):
        folder = bench.copy()
        doc = json.loads((folder / ADAPTER_CONFIG).read_text())
        doc["r"] = r
        (folder / ADAPTER_CONFIG).write_text(json.dumps(doc))
        bench.refused(folder, f"r={r}")
    campaign.tried("files", 3)


# ---------------------------------------------------------------- failed saves
def _failing_at(rng, monkeypatch, where):
    """Make save_pretrained fail ``where``: inside safetensors' writer after part of the file is
    written, inside the JSON write (a full disk), when the first file is moved into place, or
    (a crash between the two) when the second is."""
    real_save = para_io.save_file

    def save_then_fail(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(rng.randrange(os.path.getsize(path)))
        raise OSError(28, "No space left on device")

    def config_fails(path, *args):
        with open(path, "x") as f:
            f.write('{"peft_type": "PA')
        raise OSError(28, "No space left on device")

    if where == "weights":
        monkeypatch.setattr(para_io, "save_file", save_then_fail)
    elif where == "config":
        monkeypatch.setattr(para_io, "_write_config_file", config_fails)
    else:
        real_replace, calls = os.replace, []

        def refuse(*args):
            calls.append(args)
            if where == "rename" or len(calls) == 2:
                raise PermissionError(13, "Permission denied")
            real_replace(*args)
        monkeypatch.setattr(para_io.os, "replace", refuse)


def test_failed_save_leaves_old_files_intact(bench, campaign, tmp_path, monkeypatch):
    """A save_pretrained that fails midway (a full disk while writing the weights or the config,
    a refused rename) leaves the folder's old files byte for byte, and no temporary file. A save
    that dies between its two renames leaves one new file beside one old one: that pair is
    refused (the weights carry their config's checksum), never loaded as a mix."""
    rng = random.Random(5)
    n, seen = campaign.cases(16), set()
    pm = get_para_model(tiny_llama(), PARAConfig(r=4, pooler="mean"))  # the same shapes as the old files
    pm.add_adapter("extra", PARAConfig(r=2))
    randomize_adapter(pm, seed=11)
    randomize_adapter(pm, "extra", seed=12)
    for i in range(n):
        folder = tmp_path / f"save{i}"
        shutil.copytree(bench.sources["plain"], folder)
        shutil.copytree(bench.sources["plain"], folder / "extra")
        before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        where = rng.choice(["weights", "config", "rename", "second rename"])
        seen.add(where)
        with monkeypatch.context() as m:
            _failing_at(rng, m, where)
            with pytest.raises(OSError):
                pm.save_pretrained(str(folder))
        after = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        if where == "second rename":
            assert sorted(p.name for p in after) == sorted(p.name for p in before), f"case {i}: temporaries left"
            bench.refused(folder, f"case {i}: one file of a save that died between its renames")
            continue
        assert after == before, f"case {i}: failing at {where} changed the old files"
        assert bench.outcome(folder, f"case {i}: the old adapter after a failed save") == "loaded"
    assert len(seen) == 4
    campaign.tried("files", n)


def test_save_replaces_a_symlink_never_writes_through_it(bench, campaign, tmp_path):
    """A weights or config file that is a symlink to a file elsewhere is replaced by the save,
    never written through (which would overwrite the file it points to)."""
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm, seed=3)
    folder = tmp_path / "out"
    shutil.copytree(bench.sources["plain"], folder)
    victims = {}
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        victim = tmp_path / f"victim-{file}"
        victim.write_bytes(b"precious")
        (folder / file).unlink()
        (folder / file).symlink_to(victim)
        victims[file] = victim
    pm.save_pretrained(str(folder))
    for file, victim in victims.items():
        assert victim.read_bytes() == b"precious" and not (folder / file).is_symlink(), file
    assert sorted(os.listdir(folder)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    loaded = PARAModel.from_pretrained(tiny_llama(), str(folder))
    assert torch.equal(logits_of(loaded), logits_of(pm))
    campaign.tried("files", 1)


def test_campaign_memory(bench, campaign):
    """Runs last in this file: the peak RSS growth all the cases above caused."""
    campaign.measured("files: peak RSS growth over the file campaign", round(_maxrss_mb() - bench.rss0, 1), "MiB",
                      "after loading 2^28-float sparse tensors, 2^40-element headers, /dev/zero links")
    assert _maxrss_mb() - bench.rss0 < RSS_GROWTH_MB
