"""The README names files that exist: every command line it shows (fenced or inline) names
paths, modules and make targets of this repository."""
from __future__ import annotations

import re

from tests.trainer.harness import ROOT


README_COMMANDS = ("dit", "python", "torchrun", "make", "img2dataset", "huggingface-cli", "tensorboard")


def readme_commands(text: str) -> list[str]:
    """The command lines of the README: fenced lines (with their `\\` continuations) and inline
    code spans that start with a command."""
    fenced = re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line for block in fenced for line in re.sub(r"\\\n", " ", block).splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    lines = [line.split(" # ")[0].strip() for line in lines]
    return [line for line in lines if line.split(" ")[0] in README_COMMANDS]


def missing_in_command(command: str) -> list[str]:
    """What a README command names in this repository and is not there: paths under its top-level
    entries (`configs/...`, `tests/...`), modules of its packages (`-m tests.launch.x`,
    `--encoder trainer.stages.pretrain:precompute_encoder`), make targets."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    top = packages | {"configs"} | {p.name for p in ROOT.iterdir() if p.is_file()}  # not runs/, data/
    tokens = command.split()
    missing = [t for t in tokens[1:] if tokens[0] == "make" and not t.startswith("-")
               and not re.search(rf"^{re.escape(t)}:", (ROOT / "Makefile").read_text(), flags=re.M)]
    for token in (t.strip("'\"").split("=")[-1] for t in tokens):
        if token.split("/")[0] in top and not (ROOT / token).exists():
            missing.append(token)
        module = re.fullmatch(r"([a-z_]\w*(?:\.\w+)+)(?::\w+)?", token)
        if module and module.group(1).split(".")[0] in packages:
            path = ROOT / module.group(1).replace(".", "/")
            if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
                missing.append(token)
    return missing


def test_no_readme_command_names_a_file_that_does_not_exist():
    text = (ROOT / "README.md").read_text()
    commands = readme_commands(text)
    assert "python -m tests.launch.test_recipes /tmp/tiny" in commands  # the walk-through's first step
    named = set(re.findall(r"configs/[\w./-]+\.ya?ml", text))
    assert "configs/recipes/t2i_dit_xl2_256.yaml" in named  # the walk-through names the recipes
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    missing += [f"{c!r}: {m}" for c in commands for m in missing_in_command(c)]
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_the_readme_check_sees_a_missing_file():
    assert missing_in_command("dit train configs/recipes/nothing.yaml") == ["configs/recipes/nothing.yaml"]
    assert missing_in_command("python -m tests.launch.nothing DIR") == ["tests.launch.nothing"]
    assert missing_in_command("dit data precompute x --encoder trainer.nothing:f") == ["trainer.nothing:f"]
    assert missing_in_command("make no-such-target") == ["no-such-target"]
    assert missing_in_command("dit data precompute x --encoder-arg config=configs/demo.yaml") == []
