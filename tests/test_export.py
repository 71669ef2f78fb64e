"""Export: remote code that loads without the package, model cards, and what a Hub push uploads.

The remote-code loads run in subprocesses (so transformers' dynamic modules never enter the
test process), started together: one where ``tokenpacker_llava`` cannot be imported at all,
one where it is imported, as in a user's session with the package installed.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import multimodal_batch, tiny_model
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from transformers.dynamic_module_utils import check_imports, get_relative_imports

from tokenpacker_llava.export import (
    HubPushError,
    RemoteCodeError,
    count_parameters,
    files_to_upload,
    generate_remote_code,
    prepare_folder,
    push_folder,
    write_model_card,
    write_remote_code,
)
from tokenpacker_llava.export import remote_code as remote_code_module
from tokenpacker_llava.export.model_card import format_count
from tokenpacker_llava.export.remote_code import AUTO_MAP, REMOTE_CODE_FILES

MODELS = {
    "clip_llama_tokenpacker": dict(vision="clip", text="llama", projector="tokenpacker"),
    "siglip_qwen2_mlp": dict(vision="siglip", text="qwen2", projector="mlp2x_gelu"),
}
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")
GENERATE_STEPS = 4

# Run in a fresh interpreter, cwd = the export root: loads every folder with the Auto classes and
# writes what it saw (classes, logits, generated ids, errors) for the test process to check.
CHILD = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys
    from pathlib import Path

    mode, root = sys.argv[1], Path(sys.argv[2])
    models = json.loads(sys.argv[3])
    report = {"mode": mode}
    if mode == "absent":
        class HidePackage(importlib.abc.MetaPathFinder):
            # Ahead of every other finder, the editable install's included.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tokenpacker_llava":
                    raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

        sys.meta_path.insert(0, HidePackage())
        try:
            import tokenpacker_llava  # noqa: F401
            report["package_importable"] = True
        except ModuleNotFoundError:
            report["package_importable"] = False
    else:
        import tokenpacker_llava  # noqa: F401  (registers the local classes)

    import torch
    import transformers

    logits, generated = {}, {}
    report["classes"] = {}
    for name in models:
        folder = root / name
        batch = torch.load(root / f"{name}.batch.pt", weights_only=True)
        for auto in %(auto_classes)r:
            model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
            report["classes"][f"{name}/{auto}"] = [type(model).__module__, type(model.config).__module__]
            with torch.no_grad():
                logits[f"{name}/{auto}"] = model(**batch).logits
            if auto == "AutoModelForImageTextToText":
                model.generation_config.eos_token_id = None
                with torch.no_grad():
                    generated[name] = model.generate(**batch, max_new_tokens=%(steps)d, do_sample=False)
                if mode == "absent":
                    model.save_pretrained(root / f"{name}-resaved")

    if mode == "absent":
        errors = {}
        folder = root / next(iter(models))
        for label, kwargs in (("false", {"trust_remote_code": False}), ("default", {})):
            try:
                transformers.AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
                errors[label] = None
            except Exception as error:  # noqa: BLE001
                errors[label] = f"{type(error).__name__}: {error}"
        report["errors_without_trust"] = errors
    else:
        # As the model card shows: with the package imported, no trust_remote_code is needed.
        model = transformers.AutoModelForImageTextToText.from_pretrained(root / next(iter(models)))
        report["without_trust"] = type(model).__module__
    report["package_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "tokenpacker_llava")
    torch.save({"logits": logits, "generated": generated}, root / f"{mode}.outputs.pt")
    (root / f"{mode}.report.json").write_text(json.dumps(report, indent=1))
    """
) % {"auto_classes": AUTO_CLASSES, "steps": GENERATE_STEPS}


def child_env(root: Path, mode: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    }
    env.update(
        HF_MODULES_CACHE=str(root / f"modules-{mode}"),  # not ~/.cache/huggingface/modules
        HF_HOME=str(root / f"hf-home-{mode}"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both tiny models saved with remote code, and what the two subprocesses saw loading them."""
    root = tmp_path_factory.mktemp("export")
    reference = {"logits": {}, "generated": {}, "parameters": {}}
    for name, kw in MODELS.items():
        model = tiny_model(**kw)
        model.save_pretrained(root / name)
        write_remote_code(root / name)
        batch = multimodal_batch(model)
        torch.save(batch, root / f"{name}.batch.pt")
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            reference["logits"][name] = model(**batch).logits
            reference["generated"][name] = model.generate(
                **batch, max_new_tokens=GENERATE_STEPS, do_sample=False
            )
        reference["parameters"][name] = sum(p.numel() for p in model.parameters())
    script = root / "child.py"
    script.write_text(CHILD)
    processes = {
        mode: subprocess.Popen(
            [sys.executable, str(script), mode, str(root), json.dumps(list(MODELS))],
            cwd=root,
            env=child_env(root, mode),
            stdin=subprocess.DEVNULL,  # transformers' trust_remote_code prompt gets EOF at once
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("absent", "present")
    }
    results = {}
    for mode, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{mode} subprocess failed:\n{stdout}\n{stderr[-6000:]}"
        results[mode] = {
            "report": json.loads((root / f"{mode}.report.json").read_text()),
            **torch.load(root / f"{mode}.outputs.pt", weights_only=True),
        }
    return {"root": root, "reference": reference, **results}


# --- the generated code ----------------------------------------------------------------------------


def test_generated_files_compile_and_import_nothing_from_the_package(exported: dict) -> None:
    folder = exported["root"] / "clip_llama_tokenpacker"
    for filename in REMOTE_CODE_FILES:
        code = (folder / filename).read_text()
        tree = ast.parse(code)
        compile(tree, filename, "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not node.module.startswith("tokenpacker_llava"), (filename, node.lineno)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("tokenpacker_llava") for a in node.names), (
                    filename,
                    node.lineno,
                )
        assert "\nfrom tokenpacker_llava" not in code and "\nimport tokenpacker_llava" not in code
        # What transformers' loader checks: every absolute import is installed (raises otherwise).
        check_imports(folder / filename)
    modeling = folder / "modeling_tokenpacker_llava.py"
    assert get_relative_imports(modeling) == ["configuration_tokenpacker_llava"]
    assert get_relative_imports(folder / "configuration_tokenpacker_llava.py") == []
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["model_type"] == "tokenpacker_llava"
    configuration = (folder / "configuration_tokenpacker_llava.py").read_text()
    assert 'model_type = "tokenpacker_llava"' in configuration
    for name in (
        "class Registry(",
        "class TokenPacker(",
        "class MLP2xGELUProjector(",
        "class VisionEncoder(",
    ):
        assert name in configuration


def test_regeneration_is_identical(exported: dict, tmp_path: Path) -> None:
    folder = exported["root"] / "siglip_qwen2_mlp"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    write_remote_code(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after == before
    # The files do not depend on the model: every folder gets the same code.
    other = exported["root"] / "clip_llama_tokenpacker"
    for filename in REMOTE_CODE_FILES:
        assert (other / filename).read_bytes() == (folder / filename).read_bytes()
    assert generate_remote_code() == generate_remote_code()


def test_auto_map_keeps_other_entries_and_rejects_other_models(tmp_path: Path) -> None:
    model = tiny_model(projector="linear")
    model.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoProcessor": "processing_x.XProcessor"}
    config_path.write_text(json.dumps(config))
    write_remote_code(tmp_path / "m")
    assert json.loads(config_path.read_text())["auto_map"] == {
        "AutoProcessor": "processing_x.XProcessor",
        **AUTO_MAP,
    }

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="tokenpacker_llava"):
        write_remote_code(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        write_remote_code(tmp_path / "empty")


# --- loading where the package is absent / present ---------------------------------------------------


def test_loads_without_the_package_with_identical_logits(exported: dict) -> None:
    absent = exported["absent"]
    report = absent["report"]
    assert report["package_importable"] is False
    assert report["package_modules"] == []
    for name in MODELS:
        expected = exported["reference"]["logits"][name]
        for auto in AUTO_CLASSES:
            model_module, config_module = report["classes"][f"{name}/{auto}"]
            assert model_module.startswith("transformers_modules.") and model_module.endswith(
                ".modeling_tokenpacker_llava"
            )
            assert config_module.endswith(".configuration_tokenpacker_llava")
            assert torch.equal(absent["logits"][f"{name}/{auto}"], expected), (name, auto)
        assert torch.equal(absent["generated"][name], exported["reference"]["generated"][name])


def test_without_trust_remote_code_transformers_refuses(exported: dict) -> None:
    errors = exported["absent"]["report"]["errors_without_trust"]
    for label in ("false", "default"):
        assert errors[label] is not None, label
        assert errors[label].startswith("ValueError") and "trust_remote_code=True" in errors[label]
        assert "contains custom code" in errors[label]


def test_a_remote_loaded_model_saves_its_code_again(exported: dict) -> None:
    for name in MODELS:
        folder = exported["root"] / f"{name}-resaved"
        for filename in REMOTE_CODE_FILES:
            assert (folder / filename).read_bytes() == (exported["root"] / name / filename).read_bytes()
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoConfig"] == AUTO_MAP["AutoConfig"]
        assert auto_map["AutoModelForImageTextToText"] == AUTO_MAP["AutoModelForImageTextToText"]


def test_with_the_package_imported_its_classes_win(exported: dict) -> None:
    present = exported["present"]
    report = present["report"]
    assert report["without_trust"] == "tokenpacker_llava.models.modeling"
    for name in MODELS:
        expected = exported["reference"]["logits"][name]
        # The package registers all three Auto classes: its own classes win over the remote code.
        for auto in AUTO_CLASSES:
            local = report["classes"][f"{name}/{auto}"]
            assert local == ["tokenpacker_llava.models.modeling", "tokenpacker_llava.models.configuration"]
        for auto in AUTO_CLASSES:
            assert torch.equal(present["logits"][f"{name}/{auto}"], expected), (name, auto)
        assert torch.equal(present["generated"][name], exported["reference"]["generated"][name])


# --- the flattening guards ---------------------------------------------------------------------------


def fake_package(root: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A package ``PKG_<n>`` (files name it ``PKG``) that ``generate_remote_code`` flattens instead."""
    name = f"tplx_fakepkg_{next(FAKE_PACKAGES)}"
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for filename, code in files.items():
        (package / filename).write_text(code.replace("PKG", name))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setattr(remote_code_module, "PACKAGE", name)
    monkeypatch.setattr(remote_code_module, "CONFIG_ROOT", f"{name}.configuration")
    monkeypatch.setattr(remote_code_module, "MODELING_ROOT", f"{name}.modeling")
    monkeypatch.setattr(remote_code_module, "CONFIG_CLASS", "Config")
    monkeypatch.setattr(remote_code_module, "MODEL_CLASS", "Model")


FAKE_PACKAGES = itertools.count()
MODELING = """
from __future__ import annotations
from PKG.configuration import Config

class Model:
    config_class = Config
"""


def test_flattening_rejects_colliding_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(
        tmp_path,
        {
            "a.py": "from __future__ import annotations\n\ndef helper():\n    return 1\n",
            "b.py": "from __future__ import annotations\n\nhelper = 2\n",
            "configuration.py": (
                "from __future__ import annotations\n"
                "from PKG.a import helper\n"
                "from PKG import b  # noqa: F401\n\n"
                "class Config:\n    value = helper()\n"
            ),
            "modeling.py": MODELING,
        },
        monkeypatch,
    )
    with pytest.raises(RemoteCodeError, match="'helper' is bound by a.py and by b.py"):
        generate_remote_code()


def test_flattening_of_a_clean_fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(
        tmp_path,
        {
            "a.py": '"""Doc."""\n\nfrom __future__ import annotations\n\nimport math\n\n\ndef helper():\n    return math.pi\n',
            "configuration.py": (
                "from __future__ import annotations\n\nimport math\nfrom typing import TYPE_CHECKING\n\n"
                "from PKG.a import helper\n\n"
                "if TYPE_CHECKING:\n    from PKG.a import helper  # noqa: F811\n\n"
                "class Config:\n    value = helper() + math.e\n"
            ),
            "modeling.py": MODELING
            + "\n    def lazy(self):\n        from PKG.a import helper\n\n        return helper()\n",
        },
        monkeypatch,
    )
    files = generate_remote_code()
    modeling = files["modeling_tokenpacker_llava.py"]
    assert "from .configuration_tokenpacker_llava import Config, helper\n" in modeling
    assert "from tplx_fakepkg" not in modeling and "import tplx_fakepkg" not in modeling
    assert "pass  # (a package import" in modeling
    namespace: dict = {}
    exec(compile(files["configuration_tokenpacker_llava.py"], "configuration", "exec"), namespace)
    assert namespace["Config"].value == pytest.approx(3.14159265 + 2.718281828)


def test_flattening_rejects_a_package_module_used_as_a_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_package(
        tmp_path,
        {
            "a.py": "from __future__ import annotations\n\nVALUE = 1\n",
            "configuration.py": (
                "from __future__ import annotations\n"
                "from PKG import a\n\n"
                "class Config:\n    value = a.VALUE\n"
            ),
            "modeling.py": MODELING,
        },
        monkeypatch,
    )
    with pytest.raises(RemoteCodeError, match="as a namespace"):
        generate_remote_code()


# --- model card ----------------------------------------------------------------------------------------


def test_model_card(exported: dict, tmp_path: Path) -> None:
    folder = exported["root"] / "clip_llama_tokenpacker"
    training = {
        "learning_rate": 2e-5,
        "stage": "finetune",
        "output_dir": Path("/x/y"),
        "license": "apache-2.0",
    }
    path = write_model_card(
        folder,
        training_config=training,
        base_models={
            "language_model": "lmsys/vicuna-7b-v1.5",
            "vision_tower": "openai/clip-vit-large-patch14-336",
        },
        datasets=["liuhaotian/LLaVA-Instruct-150K"],
        metrics={"MME": 1500.5, "GQA": {"accuracy": 0.61234}},
        repo_id="someone/tiny-tokenpacker",
    )
    assert path == folder / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert {"tokenpacker", "llava", "multimodal"} <= set(data["tags"])
    assert data["base_model"] == ["lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"]
    assert data["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"]
    assert data["license"] == "apache-2.0"
    text = card.text
    model = tiny_model()
    assert f"**{model.config.num_image_tokens} visual tokens per image**" in text
    assert "`tokenpacker` (scale factor 2" in text and "`clip_vision_model`" in text and "`llama`" in text
    counts = count_parameters(folder)
    assert counts["total"] == exported["reference"]["parameters"]["clip_llama_tokenpacker"]
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters())
    assert f"({counts['total']:,})" in text
    assert 'from_pretrained("someone/tiny-tokenpacker", trust_remote_code=True)' in text
    assert "import tokenpacker_llava" in text
    # The training configuration: a collapsed JSON block that parses back.
    details = text.split("<details>", 1)[1].split("</details>", 1)[0]
    assert json.loads(details.split("```json\n", 1)[1].split("\n```", 1)[0]) == {
        **training,
        "output_dir": "/x/y",
    }
    assert "| MME | 1500.5 |" in text and "| GQA/accuracy | 0.6123 |" in text
    # Without metadata: the license placeholder, no empty sections.
    bare = tmp_path / "bare"
    tiny_model(vision="siglip", text="qwen2", projector="mlp2x_gelu").save_pretrained(bare)
    card = ModelCard.load(write_model_card(bare))
    assert card.data.license == "other" and card.data.base_model is None
    assert "<details>" not in card.text and "## Evaluation" not in card.text
    assert "trust_remote_code=True" not in card.text  # no remote code written yet
    assert "**144 visual tokens per image**" in card.text


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (999, "999"),
        (1000, "1K"),
        (52_300, "52.3K"),
        (999_499, "999K"),
        (999_950, "1M"),  # rounds up to the next unit, not "1e+03K"
        (1_000_000, "1M"),
        (36_722_688, "36.7M"),
        (999_600_000, "1B"),  # not "1e+03M"
        (7_241_732_096, "7.24B"),
        (999_999_999_999, "1T"),
        (1_500_000_000_000_000, "1500T"),  # past the largest unit: no exponent either
    ],
)
def test_format_count_rounds_before_choosing_the_unit(count: int, text: str) -> None:
    assert format_count(count) == text


# --- what a push uploads ------------------------------------------------------------------------------


def training_output(folder: Path) -> None:
    tiny_model(projector="mlp2x_gelu").save_pretrained(folder)
    leftovers = [
        "checkpoint-10/model.safetensors",
        "checkpoint-10/optimizer.pt",
        "checkpoint-10/rng_state.pth",
        "checkpoint-10/global_step10/mp_rank_00_model_states.pt",
        "runs/checkpoint-3/x.json",
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
        "rng_state_1.pth",
        "training_args.bin",
        "global_step10/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "latest",
        "zero_to_fp32.py",
        "extra_state.pt",
        ".git/config",
        "__pycache__/modeling_tokenpacker_llava.cpython-311.pyc",
        "trainer_state.json",
        "projector.safetensors",
    ]
    for name in leftovers:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


def test_files_to_upload_leave_out_training_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "output"
    training_output(folder)
    files = prepare_folder(folder, repo_id="someone/model")
    assert files == files_to_upload(folder)
    assert files == [
        "README.md",
        "config.json",
        "configuration_tokenpacker_llava.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_tokenpacker_llava.py",
        "projector.safetensors",
        "trainer_state.json",
    ]
    assert 'from_pretrained("someone/model", trust_remote_code=True)' in (folder / "README.md").read_text()
    # An existing card is kept.
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\nMy card\n")
    prepare_folder(folder, repo_id="someone/model")
    assert (folder / "README.md").read_text().endswith("My card\n")


def test_prepare_folder_needs_a_saved_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tokenpacker_llava"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        prepare_folder(tmp_path)


def test_push_fails_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training_output(tmp_path / "output")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="offline mode.*HF_HUB_OFFLINE"):
        push_folder(tmp_path / "output", "someone/model", token="hf_fake")


def test_push_fails_clearly_when_not_logged_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training_output(tmp_path / "output")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubPushError, match="not logged in.*hf auth login"):
        push_folder(tmp_path / "output", "someone/model")


def test_push_fails_clearly_when_the_hub_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real HfApi, pointed at a local port nobody listens on: the connection is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    training_output(tmp_path / "output")
    with pytest.raises(HubPushError, match="cannot reach the Hub"):
        push_folder(tmp_path / "output", "someone/model", token="hf_fake")
    # The folder was prepared before the network call.
    assert (tmp_path / "output" / "modeling_tokenpacker_llava.py").is_file()
