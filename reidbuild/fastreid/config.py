"""Read fast-reid YAML configs the way fast-reid does, without fast-reid or yacs.

Why not just ``yaml.safe_load``: fast-reid configs rely on ``_BASE_`` inheritance,
on yacs decoding string values with ``ast.literal_eval`` (``NAME: ("A", "B")`` is a
tuple, ``LR: 1e-5`` a float) and on defaults for every key a file leaves out.  The
result here is a plain nested dict (tuples turned into lists) so callers can hash it.

Only the sections that decide the model's architecture (MODEL.BACKBONE, MODEL.HEADS)
are checked key by key: a typo there would silently build a different network.  Every
other key fast-reid knows (DATASETS, SOLVER, TEST, ...) is carried through untouched.
"""
from __future__ import annotations

import ast
import copy
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .catalog import (
    BACKBONES,
    BN_NORMS,
    DEPTHS,
    LEGACY_POOL_NAMES,
    META_ARCHITECTURES,
    MGN_PARTS,
    POOL_NAMES,
    UNSUPPORTED_BACKBONES,
)

BASE_KEY = "_BASE_"

SUPPORTED_META_ARCHITECTURES: tuple[str, ...] = tuple(META_ARCHITECTURES)
SUPPORTED_BACKBONES: tuple[str, ...] = tuple(BACKBONES)
SUPPORTED_HEADS: tuple[str, ...] = ("EmbeddingHead",)
NECK_FEATS: tuple[str, ...] = ("before", "after")
LAST_STRIDES: tuple[int, ...] = (1, 2)
PATCH = 16  # fast-reid's ViT patch size

# fast-reid's defaults (fastreid/config/defaults.py, v1.x) for the MODEL section and the
# input sizes.  Values are typed exactly as fast-reid types them, because yacs checks
# every override against the default's type.
_DEFAULTS: dict[str, Any] = {
    "MODEL": {
        "DEVICE": "cuda",
        "META_ARCHITECTURE": "Baseline",
        "FREEZE_LAYERS": [],
        "QUEUE_SIZE": 8192,
        "BACKBONE": {
            "NAME": "build_resnet_backbone",
            "DEPTH": "50x",
            "LAST_STRIDE": 1,
            "FEAT_DIM": 2048,
            "NORM": "BN",
            "WITH_IBN": False,
            "WITH_SE": False,
            "WITH_NL": False,
            "SIE_COE": 3.0,
            "STRIDE_SIZE": (16, 16),
            "DROP_PATH_RATIO": 0.1,
            "DROP_RATIO": 0.0,
            "ATT_DROP_RATE": 0.0,
            "PRETRAIN": False,
            "PRETRAIN_PATH": "",
        },
        "HEADS": {
            "NAME": "EmbeddingHead",
            "NORM": "BN",
            "NUM_CLASSES": 0,
            "EMBEDDING_DIM": 0,
            "WITH_BNNECK": False,
            "NECK_FEAT": "before",
            "POOL_LAYER": "GlobalAvgPool",
            "CLS_LAYER": "Linear",
            "MARGIN": 0.0,
            "SCALE": 1,
        },
        "LOSSES": {
            "NAME": ("CrossEntropyLoss",),
            "CE": {"EPSILON": 0.0, "ALPHA": 0.2, "SCALE": 1.0},
            "FL": {"ALPHA": 0.25, "GAMMA": 2, "SCALE": 1.0},
            "TRI": {"MARGIN": 0.3, "NORM_FEAT": False, "HARD_MINING": False, "SCALE": 1.0},
            "CIRCLE": {"MARGIN": 0.25, "GAMMA": 128, "SCALE": 1.0},
            "COSFACE": {"MARGIN": 0.25, "GAMMA": 128, "SCALE": 1.0},
        },
        "WEIGHTS": "",
        "PIXEL_MEAN": [0.485 * 255, 0.456 * 255, 0.406 * 255],
        "PIXEL_STD": [0.229 * 255, 0.224 * 255, 0.225 * 255],
    },
    "INPUT": {
        "SIZE_TRAIN": [256, 128],
        "SIZE_TEST": [256, 128],
    },
}

# Sections whose keys are checked against the defaults (unknown key -> error).
_STRICT_SECTIONS: tuple[tuple[str, ...], ...] = (("MODEL", "BACKBONE"), ("MODEL", "HEADS"))

# Keys fast-reid dropped in its v0.3 head refactor (Sept 2020); a config that still has
# them describes a model whose checkpoint layout reidbuild does not reproduce.
_PRE_V03_KEYS: frozenset[str] = frozenset({
    "MODEL.BACKBONE.NORM_SPLIT", "MODEL.BACKBONE.VOLUME", "MODEL.HEADS.NORM_SPLIT",
    "MODEL.HEADS.IN_FEAT", "MODEL.HEADS.REDUCTION_DIM", "MODEL.HEADS.ARCFACE", "MODEL.HEADS.CIRCLE",
})

_SCALARS = (str, int, float, bool, type(None))
_MAX_NODES = 100_000  # values per file; YAML aliases can otherwise expand exponentially


def supported() -> dict[str, list[str]]:
    """What a config may select; used in error messages and by ``reidbuild`` to describe itself."""
    return {
        "MODEL.META_ARCHITECTURE": list(SUPPORTED_META_ARCHITECTURES),
        "MODEL.BACKBONE.NAME": list(SUPPORTED_BACKBONES),
        "MODEL.BACKBONE.DEPTH": list(dict.fromkeys(d for spec in BACKBONES.values() for d in spec.feat_dims)),
        "MODEL.BACKBONE.NORM": list(BN_NORMS),
        "MODEL.BACKBONE.LAST_STRIDE": [str(s) for s in LAST_STRIDES],
        "MODEL.HEADS.NAME": list(SUPPORTED_HEADS),
        "MODEL.HEADS.NORM": list(BN_NORMS),
        "MODEL.HEADS.POOL_LAYER": list(POOL_NAMES) + list(LEGACY_POOL_NAMES),
        "MODEL.HEADS.NECK_FEAT": list(NECK_FEATS),
    }


def load_config(path: Path, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a fast-reid config (with its ``_BASE_`` chain), fill defaults, apply ``opts``.

    ``opts`` maps dotted keys to values, like fast-reid's ``--opts``; string values are
    decoded with ``ast.literal_eval`` when they parse, as yacs does.  Raises
    :class:`ConfigError` for anything fast-reid would reject and for models reidbuild
    cannot build.  MODEL.DEVICE and MODEL.BACKBONE.PRETRAIN* are kept as written but never
    acted on: reidbuild builds on the CPU and takes all weights from the checkpoint.
    """
    path = Path(path)
    origins: dict[str, str] = {}
    tree = _read_with_base(path, stack=(), origins=origins)
    cfg = copy.deepcopy(_DEFAULTS)
    _merge(tree, cfg, (), origins, str(path))
    for dotted, value in (opts or {}).items():
        _apply_opt(cfg, dotted, value, path)
    out: dict[str, Any] = plain(cfg)
    check_supported(out, where=str(path))
    return out


def check_supported(cfg: dict[str, Any], where: str = "config") -> None:
    """Raise :class:`ConfigError` unless ``cfg`` describes a model reidbuild can build exactly."""
    c = _Checker(where)
    model = _section(cfg, ("MODEL",), where)
    heads = _section(cfg, ("MODEL", "HEADS"), where)
    _check_architecture(cfg, c)

    pool = c.need(heads, "MODEL.HEADS", "POOL_LAYER")
    if pool in ("Flatten", "flatten"):
        raise ConfigError(
            f"{where}: MODEL.HEADS.POOL_LAYER={pool!r} is not supported (its feature size depends on the "
            f"input size); supported: {', '.join(supported()['MODEL.HEADS.POOL_LAYER'])}"
        )
    c.one_of(pool, "MODEL.HEADS.POOL_LAYER", supported()["MODEL.HEADS.POOL_LAYER"])
    c.count(heads, "MODEL.HEADS", "EMBEDDING_DIM", 0, 65536)
    c.count(heads, "MODEL.HEADS", "NUM_CLASSES", 0)
    if c.flag(heads, "MODEL.HEADS", "WITH_BNNECK"):
        c.one_of(c.need(heads, "MODEL.HEADS", "NORM"), "MODEL.HEADS.NORM", BN_NORMS)
    c.one_of(c.need(heads, "MODEL.HEADS", "NECK_FEAT"), "MODEL.HEADS.NECK_FEAT", NECK_FEATS)

    for key, positive in (("PIXEL_MEAN", False), ("PIXEL_STD", True)):
        value = c.need(model, "MODEL", key)
        ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in value
        )
        if not ok:
            what = "3 positive finite numbers" if positive else "3 finite numbers"
            raise ConfigError(f"{where}: MODEL.{key} must be a list of {what} (R, G, B), got {value!r}")

    size = c.need(_section(cfg, ("INPUT",), where), "INPUT", "SIZE_TEST")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ConfigError(f"{where}: INPUT.SIZE_TEST must be [height, width] in positive integers, got {size!r}")


class _Checker:
    """One-line ConfigErrors for a config file: a key missing, a value not allowed, of the wrong type."""

    def __init__(self, where: str) -> None:
        self.where = where

    def need(self, section: dict[str, Any], prefix: str, key: str) -> Any:
        if key not in section:
            raise ConfigError(f"{self.where}: {prefix}.{key} is missing")
        return section[key]

    def one_of(self, value: Any, key: str, allowed: tuple[Any, ...] | list[Any]) -> None:
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{self.where}: {key}={value!r} is not supported; supported: {shown}")

    def flag(self, section: dict[str, Any], prefix: str, key: str) -> bool:
        value = self.need(section, prefix, key)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {prefix}.{key} must be true or false, got {value!r}")
        return value

    def count(self, section: dict[str, Any], prefix: str, key: str, minimum: int, maximum: int = 1 << 20) -> int:
        value = self.need(section, prefix, key)
        if type(value) is not int or not minimum <= value <= maximum:
            raise ConfigError(f"{self.where}: {prefix}.{key} must be an integer in [{minimum}, {maximum}], got {value!r}")
        return value


def _check_architecture(cfg: dict[str, Any], c: _Checker) -> None:
    """The meta-architecture and backbone must be registered (catalog) and their settings fit each other."""
    where = c.where
    model = _section(cfg, ("MODEL",), where)
    backbone = _section(cfg, ("MODEL", "BACKBONE"), where)
    meta = c.need(model, "MODEL", "META_ARCHITECTURE")
    c.one_of(meta, "MODEL.META_ARCHITECTURE", SUPPORTED_META_ARCHITECTURES)
    name = c.need(backbone, "MODEL.BACKBONE", "NAME")
    if name in UNSUPPORTED_BACKBONES:
        raise ConfigError(f"{where}: MODEL.BACKBONE.NAME={name!r} is a fast-reid backbone reidbuild does not build; "
                          f"supported: {', '.join(SUPPORTED_BACKBONES)}")
    c.one_of(name, "MODEL.BACKBONE.NAME", SUPPORTED_BACKBONES)
    c.one_of(c.need(_section(cfg, ("MODEL", "HEADS"), where), "MODEL.HEADS", "NAME"), "MODEL.HEADS.NAME",
             SUPPORTED_HEADS)
    spec = BACKBONES[name]
    depth = c.need(backbone, "MODEL.BACKBONE", "DEPTH")
    c.one_of(depth, "MODEL.BACKBONE.DEPTH", list(spec.feat_dims))
    stride = c.need(backbone, "MODEL.BACKBONE", "LAST_STRIDE")
    if type(stride) is not int:
        raise ConfigError(f"{where}: MODEL.BACKBONE.LAST_STRIDE must be 1 or 2, got {stride!r}")
    c.one_of(stride, "MODEL.BACKBONE.LAST_STRIDE", LAST_STRIDES)
    c.one_of(c.need(backbone, "MODEL.BACKBONE", "NORM"), "MODEL.BACKBONE.NORM", BN_NORMS)
    for key in ("WITH_IBN", "WITH_SE", "WITH_NL"):
        c.flag(backbone, "MODEL.BACKBONE", key)
    feat_dim = c.count(backbone, "MODEL.BACKBONE", "FEAT_DIM", 1)
    expected = spec.feat_dims[depth]
    if feat_dim != expected:
        raise ConfigError(
            f"{where}: MODEL.BACKBONE.FEAT_DIM={feat_dim} does not match the {depth} {name}'s "
            f"output width {expected}; fast-reid would build a head that cannot take it"
        )
    if meta == "MGN" and not (name == "build_resnet_backbone" and DEPTHS[depth].bottleneck):
        raise ConfigError(f"{where}: MODEL.META_ARCHITECTURE=MGN needs build_resnet_backbone with a bottleneck depth "
                          f"(50x, 101x), as fast-reid's MGN copies ResNet bottleneck blocks; got {name} {depth}")
    if name == "build_vit_backbone":
        _check_vit(cfg, where)


def _check_vit(cfg: dict[str, Any], where: str) -> None:
    """fast-reid sizes the ViT's patch grid and position embedding from INPUT.SIZE_TRAIN and STRIDE_SIZE."""
    stride = cfg["MODEL"]["BACKBONE"].get("STRIDE_SIZE")
    if not (isinstance(stride, (list, tuple)) and len(stride) == 2
            and all(type(v) is int and 0 < v <= PATCH for v in stride)):
        raise ConfigError(f"{where}: MODEL.BACKBONE.STRIDE_SIZE must be [y, x] integers in [1, {PATCH}], got {stride!r}")
    size = _section(cfg, ("INPUT",), where).get("SIZE_TRAIN")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(type(v) is int and v >= PATCH for v in size)):
        raise ConfigError(f"{where}: INPUT.SIZE_TRAIN must be [height, width] integers >= {PATCH} for the ViT "
                          f"(its patch grid is sized from it), got {size!r}")


def check_input_size(cfg: dict[str, Any], height: int, width: int, where: str) -> None:
    """Refuse an input size the model's fixed structure cannot take, before anything is built.

    ViT: fast-reid builds the patch grid and position embedding for INPUT.SIZE_TRAIN and refuses any other
    input size at inference, so the deployed input must be that size. MGN: fast-reid cuts the part branches'
    feature map into 2 and 3 stripes with ``torch.chunk``, which yields fewer stripes on maps under 5 rows
    with some heights (e.g. 4 rows -> 2 + 2), so fast-reid's own forward fails there.
    """
    model = cfg["MODEL"]
    if model["BACKBONE"]["NAME"] == "build_vit_backbone":
        train = list(cfg["INPUT"]["SIZE_TRAIN"])
        if [height, width] != train:
            raise ConfigError(f"{where}: input {height}x{width} differs from INPUT.SIZE_TRAIN {train[0]}x{train[1]}, "
                              "the only size fast-reid's ViT (patch grid, position embedding) accepts")
    if model["META_ARCHITECTURE"] == "MGN":
        rows = _resnet_rows(height)
        for parts in MGN_PARTS:
            step = -(-rows // parts)
            if -(-rows // step) != parts:
                raise ConfigError(f"{where}: input height {height} gives MGN a {rows}-row feature map that fast-reid "
                                  f"cannot cut into {parts} stripes (its own forward fails too); any height >= 67 works")


def _resnet_rows(height: int) -> int:
    """Rows of the map MGN's part branches cut: fast-reid's ResNet stem (7x7/2 conv, ceil 3x3/2 pool), then two
    stride-2 stages."""
    rows = (height + 2 * 3 - 7) // 2 + 1
    rows = -(-(rows - 3) // 2) + 1
    for _ in range(2):
        rows = (rows + 2 - 3) // 2 + 1
    return rows


# --------------------------------------------------------------------------- reading


def _read_with_base(path: Path, stack: tuple[Path, ...], origins: dict[str, str]) -> dict[str, Any]:
    """One file merged over its ``_BASE_`` chain (fast-reid's load_yaml_with_base), recording which file set each key."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"{path}: cannot resolve config path ({exc.__class__.__name__})") from None
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: _BASE_ inheritance forms a cycle: {chain}")
    tree = _read_yaml(path)
    base_ref = tree.pop(BASE_KEY, None)
    if base_ref is None:
        _record_origins(tree, (), str(path), origins)
        return tree
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise ConfigError(f"{path}: _BASE_ must be a file path string, got {base_ref!r}")
    if base_ref.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: _BASE_ {base_ref!r} is a URL; reidbuild reads local files only, download it first")
    base_path = Path(os.path.expanduser(base_ref))
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    try:
        found = base_path.is_file()
    except OSError:
        found = False
    if not found:
        raise ConfigError(f"{path}: _BASE_ file {base_ref!r} not found (looked for {base_path})")
    base = _read_with_base(base_path, (*stack, resolved), origins)
    _record_origins(tree, (), str(path), origins)
    _inherit(tree, base, (), path)
    return base


def _read_yaml(path: Path) -> dict[str, Any]:
    """The same hardened reader as manifests (safe loader, duplicate keys, size/alias/nesting limits)."""
    from .. import yamlio

    data = yamlio.load_mapping(path, "fast-reid config", ConfigError, "MODEL, INPUT, ...").data
    try:
        _check_values(data, (), str(path))
    except RecursionError:
        raise ConfigError(f"{path}: YAML is nested too deeply") from None
    mapping: dict[str, Any] = data
    return mapping


def _first_line(text: Any) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else "unknown problem"


def _check_values(node: Any, keys: tuple[str, ...], where: str,
                 _path: tuple[int, ...] = (), _budget: list[int] | None = None) -> None:
    """Only the value types yacs accepts (plus mappings/lists of them) may appear.

    Also refuses self-referencing or alias-bombed YAML (anchors can build both), which
    would otherwise recurse forever or blow up when the config is copied or hashed.
    """
    budget = [_MAX_NODES] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{where}: config is too large (more than {_MAX_NODES} values; YAML alias expansion?)")
    if isinstance(node, (dict, list, tuple)):
        if id(node) in _path:
            raise ConfigError(f"{where}: {_dotted(keys) or 'the config'} refers to itself (recursive YAML anchor)")
        _path = (*_path, id(node))
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: key {key!r} under {_dotted(keys) or 'the top level'} must be a string")
            _check_values(value, (*keys, key), where, _path, budget)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _check_values(item, keys, where, _path, budget)
    elif not isinstance(node, _SCALARS):
        raise ConfigError(
            f"{where}: {_dotted(keys)} has a {type(node).__name__} value; fast-reid configs hold only "
            "strings, numbers, booleans, null, lists and mappings"
        )


def _record_origins(tree: dict[str, Any], keys: tuple[str, ...], where: str, origins: dict[str, str]) -> None:
    for key, value in tree.items():
        full = (*keys, key)
        origins[_dotted(full)] = where
        if isinstance(value, dict):
            _record_origins(value, full, where, origins)


def _inherit(child: dict[str, Any], base: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Merge ``child`` into ``base`` in place, child winning (fast-reid's merge_a_into_b)."""
    for key, value in child.items():
        full = (*keys, key)
        if isinstance(value, dict) and key in base:
            if not isinstance(base[key], dict):
                raise ConfigError(f"{path}: cannot inherit {_dotted(full)}: it is a mapping here but not in the _BASE_ file")
            _inherit(value, base[key], full, path)
        else:
            base[key] = value


# --------------------------------------------------------------------------- merging


def _merge(tree: dict[str, Any], cfg: dict[str, Any], keys: tuple[str, ...],
           origins: dict[str, str], default_where: str) -> None:
    """Merge a loaded tree over the defaults with yacs' decoding and type checks."""
    strict = keys in _STRICT_SECTIONS
    for key, raw in tree.items():
        full = (*keys, key)
        dotted = _dotted(full)
        where = origins.get(dotted, default_where)
        if key == BASE_KEY:
            raise ConfigError(f"{where}: {dotted} is reserved; _BASE_ is only allowed at the top level of a file")
        if dotted in _PRE_V03_KEYS:
            raise ConfigError(
                f"{where}: {dotted} comes from a fast-reid config older than v0.3 (2020); reidbuild reads "
                "the v0.3+/v1.x layout (MODEL.HEADS.EMBEDDING_DIM, MODEL.BACKBONE.FEAT_DIM)"
            )
        value = _decode(raw)
        if key in cfg:
            current = cfg[key]
            if isinstance(current, dict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: {dotted} must be a mapping, got {value!r}")
                _merge(value, current, full, origins, default_where)
            else:
                cfg[key] = _coerce(value, current, dotted, where)
        elif strict:
            known = ", ".join(sorted(cfg))
            raise ConfigError(f"{where}: unknown key {dotted} (fast-reid has no such key; known in {_dotted(keys)}: {known})")
        else:
            cfg[key] = _decode_tree(value)


def _apply_opt(cfg: dict[str, Any], dotted: Any, raw: Any, path: Path) -> None:
    where = f"{path} (opts)"
    if not isinstance(dotted, str) or not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"{where}: option key {dotted!r} must be a dotted config key such as MODEL.HEADS.POOL_LAYER")
    parts = dotted.split(".")
    if BASE_KEY in parts:
        raise ConfigError(f"{where}: {BASE_KEY} can only be used in config files")
    _check_values(raw, tuple(parts), where)
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            prefix = _dotted(tuple(parts[:depth])) or "the top level"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none (not a mapping)"
            raise ConfigError(f"{where}: unknown config key {dotted} (keys under {prefix}: {known})")
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    if isinstance(node[leaf], dict):
        raise ConfigError(f"{where}: {dotted} is a section; set one of its keys instead ({', '.join(sorted(node[leaf]))})")
    node[leaf] = _coerce(_decode(raw), node[leaf], dotted, where)


def _decode(value: Any) -> Any:
    """yacs' _decode_cfg_value: strings that are Python literals become those literals."""
    if not isinstance(value, str):
        return value
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    if isinstance(decoded, (set, frozenset, dict, complex, bytes)):
        return value  # yacs would reject these types; keep the text instead
    return decoded


def _decode_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode_tree(_decode(v)) for k, v in value.items()}
    return value


def _coerce(value: Any, default: Any, dotted: str, where: str) -> Any:
    """yacs' type rule: same type as the current value, list<->tuple, None either way.

    One widening beyond yacs: an int where a float is expected (``MARGIN: 0``) is accepted.
    """
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {dotted} must be a {type(default).__name__}, got a mapping")
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return type(default)(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(
        f"{where}: {dotted} must be of type {type(default).__name__} like the value it replaces ({default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


# --------------------------------------------------------------------------- helpers


def plain(node: Any) -> Any:
    """Tuples to lists, recursively, so the config round-trips through JSON unchanged."""
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return node


def _section(cfg: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    node = cfg
    for depth in range(len(keys)):
        node = node.get(keys[depth]) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: section {_dotted(keys[: depth + 1])} is missing or not a mapping")
    section: dict[str, Any] = node
    return section


def _dotted(keys: tuple[str, ...]) -> str:
    return ".".join(keys)
