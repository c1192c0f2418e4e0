"""The Comfy Registry archive, made by the real comfy-cli: `comfy node validate`, `comfy node pack`.

The pack is copied first (the files git would commit: tracked plus untracked-not-ignored, from
the working tree) into a fresh git repository, since `comfy node pack` zips `git ls-files`
minus `.comfyignore`. comfy-cli runs with a throwaway HOME (its config.ini lands there),
`--skip-prompt` and stdin closed (no tracking question), telemetry and update checks off by
environment, and a sitecustomize that refuses and records any TCP/UDP connection from its
Python process: the test fails if comfy-cli tried the network.

comfy-cli 1.23's `validate` only exits non-zero when pyproject.toml is missing, unparsable or
has no version; bad classifiers, a malformed `requires-comfyui` and ruff's exec/eval findings
are printed warnings with exit 0. So the test also fails on any warning, and shows, on small
broken copies, that each of those is caught. A packaging test, not a unit test: it needs
comfy-cli (tests/requirements.txt, which bash scripts/setup.sh installs) and git, and fails, never
skips, without them. ``pytest -m "not packaging"`` leaves it out.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.packaging

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"].rstrip("/")

# What the archive must hold (a file, or a folder with at least one file), and must not.
MUST_HOLD = (
    "__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt",
    "nodes/", "attention/", "web/", "web/docs/", "workflows/",
    "nodes/story/fonts/ComicNeue-Bold.otf", "nodes/story/fonts/OFL.txt",
)
MUST_NOT_HOLD = ("tests/", "bench/", "docs/", "scripts/", ".ci/", ".github/")

# Loaded by the comfy-cli process (PYTHONPATH): refuses and records every internet connection.
NO_NETWORK_SITECUSTOMIZE = '''
import os, socket
_LOG = os.environ["CONSISTENT_STORY_NET_LOG"]
def _refuse(what, address):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(f"{what} {address!r}\\n")
    raise OSError(f"network disabled in this test: {what} {address!r}")
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = connect
def getaddrinfo(host, *args, **kwargs):
    _refuse("getaddrinfo", host)
socket.getaddrinfo = getaddrinfo
'''


def _fail_without_comfy_cli() -> None:
    if importlib.util.find_spec("comfy_cli") is None:
        pytest.fail(
            f"comfy-cli is not installed in {sys.executable}: it is in tests/requirements.txt "
            "(bash scripts/setup.sh installs it), or: pip install comfy-cli"
        )
    if shutil.which("git") is None:
        pytest.fail("git is needed: `comfy node pack` zips the files git tracks")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for comfy-cli and git in the copies: private HOME, no telemetry, no network."""
    _fail_without_comfy_cli()
    root = tmp_path_factory.mktemp("comfy-cli-env")
    (root / "home").mkdir()
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY", "POSTHOG", "GIT_"))}
    env.update(
        HOME=str(root / "home"), XDG_CONFIG_HOME=str(root / "home" / ".config"),
        DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1", COMFY_NO_UPDATE_CHECK="1",
        PYTHONPATH=str(root / "site"), CONSISTENT_STORY_NET_LOG=str(root / "network.log"),
        GIT_CONFIG_NOSYSTEM="1", GIT_LITERAL_PATHSPECS="1",
    )
    yield env
    log = Path(env["CONSISTENT_STORY_NET_LOG"])
    assert not log.exists(), f"comfy-cli tried the network:\n{log.read_text(encoding='utf-8')}"


def comfy(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`comfy --skip-prompt --no-json <args>` in ``cwd``; output is stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-json", *args],
        check=False, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=120,
    )


def validate_problems(result: subprocess.CompletedProcess) -> list[str]:
    """What makes a `comfy node validate` run unfit to publish: its exit code and its warnings."""
    problems = [] if result.returncode == 0 else [f"exit code {result.returncode}"]
    problems += [
        line.strip() for line in result.stdout.splitlines()
        if re.search(r"\b(warning|error)s?\b", line, re.IGNORECASE)
    ]
    return problems


def files_to_publish() -> list[str]:
    """What a commit of the working tree would hold: tracked + untracked files not ignored."""
    out = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, stdout=subprocess.PIPE, timeout=60,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (REPO_ROOT / p).is_file()})


@pytest.fixture(scope="module")
def published(cli_env, tmp_path_factory):
    """A git copy of the pack, the output of `comfy node validate` there, and node.zip's names."""
    copy = tmp_path_factory.mktemp("published") / "consistent-story"
    files = files_to_publish()
    for rel in files:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, copy / rel)
    git = ["git", "-c", "core.autocrlf=false", "-C", str(copy)]
    subprocess.run([*git, "init", "-q"], check=True, env=cli_env, timeout=60)
    subprocess.run([*git, "add", "-f", "--pathspec-from-file=-", "--pathspec-file-nul"], check=True,
                   env=cli_env, input="\0".join(files).encode(), timeout=60)

    validated = comfy(cli_env, copy, "node", "validate")
    packed = comfy(cli_env, copy, "node", "pack")
    assert packed.returncode == 0, packed.stdout
    with zipfile.ZipFile(copy / "node.zip") as archive:
        names = archive.namelist()
        texts = {n: archive.read(n).decode("utf-8") for n in names if n.endswith(".md")}
    return {"validate": validated, "names": names, "markdown": texts, "files": files}


def test_comfy_node_validate_passes_without_warnings(published):
    result = published["validate"]
    assert "Running security checks" in result.stdout, result.stdout  # ruff really ran
    assert validate_problems(result) == [], result.stdout


GOOD_PYPROJECT = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("broken", "extra_file"),
    [
        pytest.param(re.sub(r'^version = "[^"]*"', 'version = ""', GOOD_PYPROJECT, count=1,
                            flags=re.MULTILINE),
                     None, id="empty-version"),
        pytest.param(GOOD_PYPROJECT + "\n[broken\n", None, id="unparsable"),
        pytest.param(GOOD_PYPROJECT.replace("GPU :: NVIDIA CUDA", "GPU :: CUDA", 1), None,
                     id="unknown-accelerator"),
        pytest.param(GOOD_PYPROJECT.replace("Operating System :: OS Independent",
                                            "Operating System :: Linux", 1), None, id="unknown-os"),
        pytest.param(re.sub(r'requires-comfyui = "[^"]*"', 'requires-comfyui = ">=0.3"', GOOD_PYPROJECT),
                     None, id="malformed-requires-comfyui"),
        pytest.param(GOOD_PYPROJECT, "exec(input())\n", id="exec-in-code"),
    ],
)
def test_comfy_node_validate_reports_each_real_problem(cli_env, tmp_path, broken, extra_file):
    assert broken != GOOD_PYPROJECT or extra_file, "the broken variant must differ from the real one"
    (tmp_path / "pyproject.toml").write_text(broken, encoding="utf-8")
    (tmp_path / "LICENSE").write_text("x", encoding="utf-8")
    if extra_file:
        (tmp_path / "loader.py").write_text(extra_file, encoding="utf-8")
    result = comfy(cli_env, tmp_path, "node", "validate")
    assert validate_problems(result), result.stdout


def test_the_archive_holds_the_pack_and_nothing_of_the_repository_tooling(published):
    names = set(published["names"])
    missing = [
        want for want in MUST_HOLD
        if not (any(n.startswith(want) for n in names) if want.endswith("/") else want in names)
    ]
    assert missing == [], f"node.zip lacks {missing}"
    leaked = sorted(n for n in names if n.startswith(MUST_NOT_HOLD) or "__pycache__" in n)
    assert leaked == [], f"node.zip holds {leaked}"
    # Everything else that would be committed is in it (nothing lost to a .comfyignore pattern).
    lost = [f for f in published["files"] if f not in names and not f.startswith(MUST_NOT_HOLD)]
    assert lost == [], f"committed files left out of node.zip: {lost}"


_FENCED = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK_TARGETS = (
    re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),  # [text](target), ![alt](target)
    re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE),  # [ref]: target
    re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE),  # <img src>, <a href>
)


def link_targets(markdown: str) -> list[str]:
    text = _CODE.sub("code", _FENCED.sub("", markdown))
    return [m.group(1) for pattern in _LINK_TARGETS for m in pattern.finditer(text)]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCED.sub("", markdown), re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_every_link_in_the_archives_markdown_resolves_inside_it(published):
    names = set(published["names"])
    markdown = published["markdown"]
    assert "README.md" in markdown
    assert link_targets(markdown["README.md"]), "no links found: the link parser is broken"
    broken = []
    for doc, text in markdown.items():
        for target in link_targets(text):
            if re.match(r"(https?|mailto):", target, re.IGNORECASE):
                continue
            path, _, anchor = target.partition("#")
            if not path:  # an anchor in this document
                if anchor not in heading_anchors(text):
                    broken.append(f"{doc}: {target} (no such heading)")
                continue
            resolved = os.path.normpath(PurePosixPath(doc).parent / path).replace(os.sep, "/")
            if resolved not in names and not any(n.startswith(resolved.rstrip("/") + "/") for n in names):
                broken.append(f"{doc}: {target}")
    assert broken == [], "links that do not resolve inside node.zip:\n" + "\n".join(broken)


def test_absolute_links_into_the_repository_name_files_it_has(published):
    """README's `<Repository>/blob|raw/main/<path>` links and the Registry icon point at real files."""
    files = set(published["files"])
    raw_base = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    targets = [t for text in published["markdown"].values() for t in link_targets(text)]
    targets.append(PYPROJECT["tool"]["comfy"]["Icon"])
    missing = []
    checked = 0
    for target in targets:
        url = target.split("#")[0].split("?")[0]
        for base in (f"{REPOSITORY}/blob/main/", f"{REPOSITORY}/raw/main/", raw_base):
            if url.startswith(base):
                checked += 1
                if url[len(base):] not in files:
                    missing.append(target)
    assert checked >= 2, "README's images and docs links are expected as absolute repository links"
    assert missing == [], f"links to files the repository lacks: {missing}"


def test_pyproject_has_what_the_registry_shows():
    project, comfy_table = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,99}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and comfy_table["PublisherId"] and comfy_table["DisplayName"]
    assert (REPO_ROOT / project["license"]["file"]).is_file()
    for key in ("Repository", "Issues"):
        assert project["urls"][key].startswith("https://github.com/"), key
    assert project["urls"]["Issues"] == REPOSITORY + "/issues"
    classifiers = project["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    assert any(c.startswith("Environment :: GPU :: ") for c in classifiers)
