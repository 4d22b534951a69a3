"""The model's chat template, rendered for a calibration sample under bounds.

The template comes with the model folder: Jinja code qvlquant did not write. transformers renders it in a sandbox
(no file or attribute access), but the sandbox bounds neither time nor output: nested loops run until the process is
killed. Here the rendering gets a deadline (TEMPLATE_SECONDS) and its text a bound (TEMPLATE_CHARS_PER_TOKEN
characters per token of ``max_length``): SIGALRM stops it in the main thread, and elsewhere it renders in a worker
thread that is stopped at the deadline. A template that raises, does not parse or includes another file fails with
one error naming the sample and the template.
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Callable

from qvlquant.calib.config import CalibConfig
from qvlquant.calib.errors import CalibrationError

TEMPLATE_SECONDS = 5.0  # a real chat template renders a calibration sample in milliseconds
TEMPLATE_CHARS_PER_TOKEN = 64  # the rendered text may hold at most this many characters per token of max_length


class TemplateTimeout(BaseException):
    """The deadline passed. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` inside jinja2
    or transformers catches it on its way out of the template."""


def _in_main_thread(call: Callable, seconds: float):
    """``call()`` interrupted by SIGALRM after ``seconds``; the previous handler and any pending timer are restored."""

    def expire(signum, frame):
        raise TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # someone else's alarm: let it ring when it would have (at once if that has passed)
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 1e-3))


def _stop(thread: threading.Thread) -> None:
    """Raise TemplateTimeout inside ``thread`` at its next bytecode (CPython's PyThreadState_SetAsyncExc): a
    template is Python code, so its loop stops there."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(TemplateTimeout))
    thread.join(1.0)


def _in_a_thread(call: Callable, seconds: float):
    """``call()`` in a worker thread, stopped after ``seconds``: signals reach only the main thread, so this is the
    way elsewhere. Any stray TemplateTimeout lands in the worker, never in the caller's code."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=run, name="qvlquant-chat-template", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        _stop(worker)
        raise TemplateTimeout
    if "error" in result:
        raise result["error"]
    return result["value"]


def with_deadline(call: Callable, seconds: float):
    """``call()``, or TemplateTimeout once ``seconds`` have passed."""
    if threading.current_thread() is threading.main_thread():
        return _in_main_thread(call, seconds)
    return _in_a_thread(call, seconds)


def template_name(processor) -> str:
    folder = getattr(processor, "name_or_path", None) or getattr(processor.tokenizer, "name_or_path", None)
    return f"the chat template of {folder}" if folder else "the model's chat template"


def render_chat(processor, messages: list[dict], cfg: CalibConfig, name: str) -> str:
    """``messages`` through the processor's chat template as text, bounded in time and length; errors name ``name``
    (the sample) and the template."""
    template = template_name(processor)
    try:
        text = with_deadline(lambda: processor.apply_chat_template(messages, tokenize=False), TEMPLATE_SECONDS)
    except TemplateTimeout:
        raise CalibrationError(f"{name}: {template} did not finish within {TEMPLATE_SECONDS:g} s (a loop that does "
                               "not end?); fix the template in the model folder") from None
    except Exception as e:  # noqa: BLE001 -- jinja2's TemplateError and anything the template's own code raised
        raise CalibrationError(f"{name}: {template} failed: {type(e).__name__}: {e}; fix the template in the model "
                               "folder") from None
    limit = TEMPLATE_CHARS_PER_TOKEN * cfg.max_length
    if len(text) > limit:
        raise CalibrationError(f"{name}: {template} wrote {len(text)} characters, over {TEMPLATE_CHARS_PER_TOKEN} per "
                               f"token of max_length {cfg.max_length} ({limit}); fix the template in the model folder")
    return text
