"""The test suite's own helpers: the synthetic corpus generator (tests/textgen.py) and the traceback check
for logs that mix Ray's output with ours (tests/logcheck.py)."""

from __future__ import annotations

import pytest
import textgen
from logcheck import assert_no_traceback_from_our_code, is_our_file, tracebacks_from_our_code

from job.data import corpus

# ------------------------------------------------------------------------------------------------ textgen


def test_story_is_deterministic_and_sized():
    text = textgen.story(25_000, seed=1)
    assert len(text) == 25_000 and text == text.strip()
    assert text == textgen.story(25_000, seed=1) and text != textgen.story(25_000, seed=2)
    for size in (1, 100, 4000, 12_345):  # a shorter story is the same story cut shorter (trailing blanks dropped)
        assert textgen.story(size, seed=1) == text[:size].rstrip() and len(text[:size].rstrip()) > size - 3
    assert text.isascii()  # N characters are N bytes: the tests cut books by bytes and by characters


def test_story_has_the_character_mix_of_prose():
    text = textgen.story(25_000)
    chars = set(text)
    assert set("abcdefghijklmnopqrstuvwxyz") <= chars  # e.g. test_generate's prompts need q, w, ...
    assert {".", ",", "?", "!", '"', "'", ";", "\n"} <= chars
    assert any(c.isupper() for c in chars) and any(c.isdigit() for c in chars)
    assert "#" not in chars  # test_generate relies on '#' being outside the vocabulary
    digits = sum(c.isdigit() for c in text)
    assert 0 < digits < len(text) / 200  # digits are rare
    assert "\n\n" in text and "CHAPTER II." in text
    assert 35 <= len(set(text.lower())) <= 60


@pytest.mark.parametrize("style", ["new", "old"])
def test_gutenberg_wraps_with_markers_the_cleaner_strips(style):
    body = textgen.story(3000, seed=4)
    book = textgen.gutenberg(body, style=style, title="The Copper Kettle")
    this_or_the = "THE" if style == "new" else "THIS"
    assert f"*** START OF {this_or_the} PROJECT GUTENBERG EBOOK THE COPPER KETTLE ***" in book
    assert f"*** END OF {this_or_the} PROJECT GUTENBERG EBOOK THE COPPER KETTLE ***" in book
    head, tail = book.split(body)
    assert head.count("\n") > 5 and tail.count("\n") > 3  # real boilerplate lines on both sides
    assert corpus.clean(book) == body.lower() + "\n"
    crlf_bom = textgen.gutenberg(body, style=style, crlf=True, bom=True)
    assert crlf_bom.startswith("\ufeff") and "\r\n" in crlf_bom and "\n" not in crlf_bom.replace("\r\n", "")
    with pytest.raises(ValueError):
        textgen.gutenberg(body, style="newest")


def test_book_is_the_opening_of_a_gutenberg_file():
    book = textgen.book(6000, seed=2)
    assert len(book) == len(book.encode()) == 6000
    assert "*** START OF THIS PROJECT GUTENBERG EBOOK" in book
    cleaned = corpus.clean(book)
    assert "gutenberg" not in cleaned and 5000 < len(cleaned) < 6000


def test_corpus_file_fixture(corpus_file, tmp_path):
    path = corpus_file(4000, seed=3, name="c.txt")
    assert path == tmp_path / "c.txt" and path.read_bytes() == textgen.book(4000, seed=3).encode()


# ----------------------------------------------------------------------------------------------- logcheck

RAY_INTERNAL = """\
(TrainController pid=4242) Failed to stop PlacementGroupCleaner gracefully, killing it.
(TrainController pid=4242) Traceback (most recent call last):
(TrainController pid=4242)   File "/work/main/.venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/\
worker_group/placement_group_cleaner.py", line 88, in stop
(TrainController pid=4242)     ray.get(self._actor.stop.remote(), timeout=5)
(TrainController pid=4242)   File "/work/main/.venv/lib/python3.11/site-packages/ray/_private/worker.py", line 2961, \
in get
(TrainController pid=4242)     values, debugger_breakpoint = worker.get_objects(object_refs, timeout=timeout)
(TrainController pid=4242)                                   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
(TrainController pid=4242) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.
Traceback (most recent call last):
  File "/usr/lib/python3/dist-packages/ray/dashboard/modules/job/job_manager.py", line 10, in _monitor_job
    raise RuntimeError("job supervisor died")
RuntimeError: job supervisor died
epoch   1/2  loss 3.1
"""

OURS = """\
epoch   1/2  loss 3.1
(RayTrainWorker pid=777) Traceback (most recent call last):
(RayTrainWorker pid=777)   File "/tmp/ray/session_2025/runtime_resources/working_dir_files/_ray_pkg_abc/job/\
training/worker.py", line 301, in train_func
(RayTrainWorker pid=777)     self.run_epoch()
(RayTrainWorker pid=777) ValueError: bad shape
final line
"""


def test_ray_internal_tracebacks_pass():
    assert "Traceback" in RAY_INTERNAL
    assert_no_traceback_from_our_code(RAY_INTERNAL)
    assert_no_traceback_from_our_code("no traceback at all\n")


def test_a_traceback_through_our_code_fails_and_shows_the_block():
    with pytest.raises(AssertionError) as failure:
        assert_no_traceback_from_our_code(RAY_INTERNAL + OURS)
    message = str(failure.value)
    assert "_ray_pkg_abc/job/training/worker.py" in message and "ValueError: bad shape" in message
    assert "PlacementGroupCleaner" not in message and "final line" not in message
    [block] = tracebacks_from_our_code(OURS)
    assert block.startswith("Traceback (most recent call last):") and block.endswith("ValueError: bad shape")


def test_ray_remote_error_without_a_traceback_header_counts_too():
    text = ('\x1b[36m(RayTrainWorker pid=9)\x1b[0m ray::RayTrainWorker.run() (pid=9, ip=127.0.0.1)\n'
            '\x1b[36m(RayTrainWorker pid=9)\x1b[0m   File "/srv/app/job/data/windows.py", line 3, in shard\n'
            '\x1b[36m(RayTrainWorker pid=9)\x1b[0m ValueError: x\n')
    [block] = tracebacks_from_our_code(text)
    assert block.startswith("ray::RayTrainWorker.run()") and "job/data/windows.py" in block


@pytest.mark.parametrize("path, ours", [
    ("/work/main/job/training/worker.py", True),
    ("/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc/job/training/worker.py", True),
    ("/venv/lib/python3.11/site-packages/job/train.py", True),  # a non-editable install of ours
    ("/work/main/infra/localstack.py", True),
    ("job/core/storage.py", True),
    ("/venv/lib/python3.11/site-packages/ray/dashboard/modules/job/job_manager.py", False),
    ("/opt/ray/dashboard/modules/job/common.py", False),
    ("/src/ray/python/ray/job/train.py", False),
    ("/work/main/job/not_a_module_of_ours.py", False),
    ("/work/main/other/worker.py", False),
    ("<frozen runpy>", False),
])
def test_which_files_are_ours(path, ours):
    assert is_our_file(path) is ours
