"""Self-contained remote code, so a saved folder loads where this package is not installed.

``write_remote_code(folder)`` writes ``configuration_tokenpacker_llava.py`` and
``modeling_tokenpacker_llava.py`` next to a folder's ``config.json`` and adds the ``auto_map``
that lets ``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` /
``AutoModel`` load it with ``trust_remote_code=True``.

Both files are generated from this package's own source, never maintained by hand: the
modules the configuration (resp. the model) needs are found by following their
``tokenpacker_llava`` imports, and concatenated in dependency order with those imports
removed. The configuration file holds everything the configuration needs (registry,
projectors, vision encoder, configuration); the modeling file holds the model and takes
the rest from the configuration file by a relative import, which transformers' dynamic
module loader follows and copies along. Flattening modules into one namespace is only
correct when no two of them bind the same top-level name to different things, so that is
checked, as is that the result compiles.

Where the package *is* imported, transformers prefers the locally registered classes over
the remote code (it registers ``tokenpacker_llava`` with ``AutoConfig`` at import), so the
same folder keeps loading with the package's classes there.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "tokenpacker_llava"
CONFIG_MODULE = "configuration_tokenpacker_llava"
MODELING_MODULE = "modeling_tokenpacker_llava"
CONFIG_ROOT = f"{PACKAGE}.models.configuration"
MODELING_ROOT = f"{PACKAGE}.models.modeling"
CONFIG_CLASS = "TokenPackerLlavaConfig"
MODEL_CLASS = "TokenPackerLlavaForConditionalGeneration"

AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}",
    "AutoModel": f"{MODELING_MODULE}.{MODEL_CLASS}",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.{MODEL_CLASS}",
    "AutoModelForImageTextToText": f"{MODELING_MODULE}.{MODEL_CLASS}",
}
REMOTE_CODE_FILES = (f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py")

# Top-level names that describe a module rather than define anything; dropped when flattening.
_DROPPED_NAMES = frozenset({"__all__"})


class RemoteCodeError(RuntimeError):
    """The package's modules cannot be flattened into self-contained remote code."""


@dataclass
class _Module:
    """One parsed package module and what flattening it needs to know."""

    name: str
    path: Path
    source: str
    tree: ast.Module
    futures: tuple[str, ...] = ()
    deps: list[str] = field(default_factory=list)  # internal modules, in import order
    imported_names: dict[str, str] = field(default_factory=dict)  # name -> internal module
    bindings: dict[str, str] = field(default_factory=dict)  # top-level name -> what it is bound to
    loads: set[str] = field(default_factory=set)  # every name read anywhere in the module
    dropped_lines: set[int] = field(default_factory=set)  # 1-based lines of removed statements
    replaced_lines: dict[int, str] = field(default_factory=dict)  # 1-based line -> its replacement

    @property
    def relpath(self) -> str:
        return self.path.as_posix().rsplit(f"/{PACKAGE}/", 1)[-1]


def _is_internal(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _module_path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RemoteCodeError(f"cannot find the source file of module {name!r}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _statement_key(node: ast.stmt, source: str) -> str:
    return ast.get_source_segment(source, node) or ast.dump(node)


def _parse(name: str) -> _Module:
    path = _module_path(name)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    module = _Module(name=name, path=path, source=source, tree=tree)
    top_level = set()
    for index, node in enumerate(tree.body):
        top_level.add(id(node))
        drop = False
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            drop = isinstance(node.value.value, str)  # the module docstring
        elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
            module.futures += tuple(alias.name for alias in node.names)
            drop = True
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_internal(node.module):
            _record_internal_from(module, node)
            drop = True
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise RemoteCodeError(f"{module.relpath}:{node.lineno}: use absolute imports, not relative ones")
        elif isinstance(node, ast.Import) and any(_is_internal(a.name) for a in node.names):
            raise RemoteCodeError(
                f"{module.relpath}:{node.lineno}: `import {PACKAGE}...` cannot be flattened; "
                f"use `from {PACKAGE}.<module> import <name>`"
            )
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if isinstance(node, ast.Import):
                    bound = alias.asname or alias.name.split(".")[0]  # `import a.b` binds `a`
                    target = f"import {alias.name if alias.asname else bound}"
                else:
                    bound = alias.asname or alias.name
                    target = f"from {node.module} import {alias.name}"
                _bind(module, bound, target)
        elif _binds_dropped_name(node):
            drop = True
        else:
            for bound in _bound_names(node):
                _bind(module, bound, _statement_key(node, source))
        if drop:
            _check_whole_lines(module, node)
            module.dropped_lines.update(range(node.lineno, node.end_lineno + 1))
    # Package imports inside functions (lazy imports) or `if` blocks: the names they bind are
    # top-level names of the flattened file, so the statement becomes `pass`.
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            module.loads.add(node.id)
        if id(node) in top_level or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise RemoteCodeError(f"{module.relpath}:{node.lineno}: use absolute imports, not relative ones")
        if isinstance(node, ast.Import) and any(_is_internal(a.name) for a in node.names):
            raise RemoteCodeError(
                f"{module.relpath}:{node.lineno}: `import {PACKAGE}...` cannot be flattened; "
                f"use `from {PACKAGE}.<module> import <name>`"
            )
        if isinstance(node, ast.ImportFrom) and _is_internal(node.module):
            _record_internal_from(module, node)
            _check_whole_lines(module, node)
            module.replaced_lines[node.lineno] = (
                " " * node.col_offset + "pass  # (a package import; its names are module-level here)"
            )
            module.dropped_lines.update(range(node.lineno + 1, node.end_lineno + 1))
    _check_local_rebinding(module)
    return module


def _record_internal_from(module: _Module, node: ast.ImportFrom) -> None:
    for alias in node.names:
        if alias.name == "*":
            raise RemoteCodeError(f"{module.relpath}:{node.lineno}: star imports cannot be flattened")
        if alias.asname and alias.asname != alias.name:
            raise RemoteCodeError(
                f"{module.relpath}:{node.lineno}: `import {alias.name} as {alias.asname}` from the package "
                "cannot be flattened (one namespace); import it under its own name"
            )
        submodule = f"{node.module}.{alias.name}"
        if _is_module(submodule):
            # `from pkg import submodule`: only its definitions are needed, and they must not be
            # reached as `submodule.name`, which has no meaning once flattened.
            module.deps.append(submodule)
            module.imported_names[alias.name] = f"<module {submodule}>"
        else:
            module.deps.append(node.module)
            module.imported_names[alias.name] = node.module


def _binds_dropped_name(node: ast.stmt) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and all(
        isinstance(t, ast.Name) and t.id in _DROPPED_NAMES for t in targets
    )


def _bound_names(node: ast.stmt) -> Iterable[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
        return
    # Package imports nested in the statement (`if TYPE_CHECKING:` ...) become `pass`: no binding.
    removed = {
        id(alias)
        for sub in ast.walk(node)
        if isinstance(sub, ast.ImportFrom) and sub.level == 0 and _is_internal(sub.module)
        for alias in sub.names
    }
    for sub in ast.walk(node):
        if id(sub) in removed:
            continue
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store | ast.Del):
            yield sub.id
        elif isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield sub.name
        elif isinstance(sub, ast.alias):
            yield sub.asname or sub.name.split(".")[0]


def _bind(module: _Module, name: str, target: str) -> None:
    previous = module.bindings.get(name)
    module.bindings[name] = target if previous in (None, target) else f"{previous}\n{target}"


def _check_whole_lines(module: _Module, node: ast.stmt) -> None:
    lines = module.source.splitlines()
    before = lines[node.lineno - 1][: node.col_offset]
    after = lines[node.end_lineno - 1][node.end_col_offset :].strip()
    if before.strip() or (after and not after.startswith("#")):
        raise RemoteCodeError(
            f"{module.relpath}:{node.lineno}: a removed import shares its line with other code"
        )


def _check_local_rebinding(module: _Module) -> None:
    """A function that both lazily imports a package name and assigns it cannot lose the import."""
    for scope in ast.walk(module.tree):
        if not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        imported = {
            alias.asname or alias.name
            for node in ast.walk(scope)
            if isinstance(node, ast.ImportFrom) and _is_internal(node.module)
            for alias in node.names
        }
        stored = {
            node.id
            for node in ast.walk(scope)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
        }
        stored |= {a.arg for a in ast.walk(scope.args) if isinstance(a, ast.arg)}
        if imported & stored:
            raise RemoteCodeError(
                f"{module.relpath}:{scope.lineno}: {scope.name} imports and also assigns "
                f"{sorted(imported & stored)}; cannot be flattened"
            )


def _collect(root: str, modules: dict[str, _Module]) -> list[str]:
    """``root`` and every package module it needs, dependencies first (depth-first, import order)."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise RemoteCodeError(f"import cycle between package modules: {cycle}")
        visiting.append(name)
        if name not in modules:
            modules[name] = _parse(name)
        for dep in modules[name].deps:
            visit(dep)
        visiting.pop()
        order.append(name)

    visit(root)
    return order


def _check_namespace(names: list[str], modules: dict[str, _Module], provided: Iterable[str] = ()) -> None:
    """Flattening ``names`` into one namespace must not change what any name refers to."""
    owners: dict[str, tuple[str, str]] = {}
    conflicts = []
    for name in names:
        module = modules[name]
        for bound, target in module.bindings.items():
            if bound in owners and owners[bound][1] != target:
                conflicts.append(f"{bound!r} is bound by {owners[bound][0]} and by {module.relpath}")
            owners.setdefault(bound, (module.relpath, target))
    for name in provided:
        if name in owners:
            conflicts.append(
                f"{name!r} is bound by {owners[name][0]} and imported from the configuration file"
            )
    available = set(owners) | set(provided)
    for name in names:
        module = modules[name]
        for imported, origin in module.imported_names.items():
            if origin.startswith("<module "):
                if imported in module.loads:
                    raise RemoteCodeError(
                        f"{module.relpath} uses the package module {imported!r} as a namespace "
                        f"({imported}.<name>); import the names it needs instead"
                    )
            elif imported not in available:
                raise RemoteCodeError(
                    f"{module.relpath} imports {imported!r}, which no flattened module defines"
                )
        for bound in module.bindings:
            if hasattr(builtins, bound):
                users = [modules[n].relpath for n in names if n != name and bound in modules[n].loads]
                if users:
                    conflicts.append(f"{module.relpath} shadows the builtin {bound!r} that {users} use")
    if conflicts:
        raise RemoteCodeError(
            "cannot flatten the package into remote code, top-level names collide: " + "; ".join(conflicts)
        )


def _body(module: _Module) -> str:
    lines = module.source.splitlines()
    kept = [
        module.replaced_lines.get(number, line)
        for number, line in enumerate(lines, start=1)
        if number not in module.dropped_lines
    ]
    text = "\n".join(kept).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text)


def _futures(names: list[str], modules: dict[str, _Module]) -> tuple[str, ...]:
    variants = {tuple(sorted(set(modules[n].futures))) for n in names}
    if len(variants) > 1:
        detail = ", ".join(f"{modules[n].relpath}: {sorted(set(modules[n].futures))}" for n in names)
        raise RemoteCodeError(
            "package modules flattened together must share their `from __future__` imports "
            f"(they would change each other's semantics): {detail}"
        )
    return variants.pop() if variants else ()


def _render(title: str, names: list[str], modules: dict[str, _Module], header_imports: list[str]) -> str:
    sources = "".join(f"- {modules[n].relpath}\n" for n in names)
    parts = [
        f'"""{title}\n\n'
        f"Generated by {__name__} from these modules of the {PACKAGE} package, in\n"
        "this order; do not edit, regenerate with ``write_remote_code(folder)``.\n\n"
        f'{sources}"""\n\n'
    ]
    futures = _futures(names, modules)
    if futures:
        parts.append(f"from __future__ import {', '.join(futures)}\n")
    for line in header_imports:
        parts.append(line + "\n")
    for name in names:
        rule = "# " + "-" * 96
        parts.append(f"\n\n{rule}\n# {modules[name].relpath}\n{rule}\n\n{_body(modules[name])}\n")
    return "".join(parts)


def _validate(code: str, filename: str) -> None:
    try:
        tree = ast.parse(code, filename=filename)
        compile(tree, filename, "exec")
    except SyntaxError as error:
        raise RemoteCodeError(f"the generated {filename} does not compile: {error}") from error
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        module = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
        if _is_internal(module) or any(_is_internal(n) for n in names):
            raise RemoteCodeError(f"the generated {filename} still imports {PACKAGE} (line {node.lineno})")


def generate_remote_code() -> dict[str, str]:
    """The two remote-code files, ``{file name: source}``, generated from the package's source."""
    modules: dict[str, _Module] = {}
    config_names = _collect(CONFIG_ROOT, modules)
    model_closure = _collect(MODELING_ROOT, modules)
    model_names = [n for n in model_closure if n not in config_names]
    _check_namespace(config_names, modules)
    if CONFIG_CLASS not in {b for n in config_names for b in modules[n].bindings}:
        raise RemoteCodeError(f"{CONFIG_ROOT} does not define {CONFIG_CLASS}")

    # What the modeling modules take from the configuration file's modules.
    config_bound = {b for n in config_names for b in modules[n].bindings}
    provided = sorted(
        imported
        for n in model_names
        for imported, origin in modules[n].imported_names.items()
        if origin in config_names and imported in config_bound
    )
    provided = sorted(set(provided))
    _check_namespace(model_names, modules, provided=provided)
    if MODEL_CLASS not in {b for n in model_names for b in modules[n].bindings}:
        raise RemoteCodeError(f"{MODELING_ROOT} does not define {MODEL_CLASS}")

    files = {
        f"{CONFIG_MODULE}.py": _render(
            "TokenPacker-LLaVA configuration, for loading with `trust_remote_code=True`.",
            config_names,
            modules,
            [],
        ),
        f"{MODELING_MODULE}.py": _render(
            "TokenPacker-LLaVA model, for loading with `trust_remote_code=True`.",
            model_names,
            modules,
            # One line: transformers finds the files a module needs by scanning `from .x import` lines.
            [f"from .{CONFIG_MODULE} import {', '.join(provided)}"] if provided else [],
        ),
    }
    for filename, code in files.items():
        _validate(code, filename)
    return files


def write_remote_code(folder: str | Path) -> None:
    """Write the remote-code files into a ``save_pretrained`` folder and add ``auto_map`` to its config.

    Idempotent: regenerating writes identical files, and other ``auto_map`` entries are kept.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; save the model with save_pretrained first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "tokenpacker_llava":
        raise ValueError(
            f"{config_path} has model_type {config.get('model_type')!r}, not 'tokenpacker_llava'; "
            "remote code is only written for TokenPacker-LLaVA folders"
        )
    for filename, code in generate_remote_code().items():
        (folder / filename).write_text(code, encoding="utf-8")
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    # The layout transformers writes (PreTrainedConfig.to_json_string).
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
