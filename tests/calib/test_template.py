"""The model's chat template renders calibration samples under a deadline and an output bound; its errors name it."""

import signal
import threading
import time

import pytest
from PIL import Image

from qvlquant.calib.dataset import CalibConfig, CalibrationError, encode_sample
from qvlquant.calib.template import TEMPLATE_SECONDS

SAMPLE = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (28, 28))},
                                       {"type": "text", "text": "what is it?"}]}]
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"


def encode_with(processor, monkeypatch, template):
    monkeypatch.setattr(processor, "chat_template", template)
    return encode_sample(processor, SAMPLE, CalibConfig(), "rows.jsonl:2")


def test_a_template_that_does_not_end_is_stopped_within_seconds(demo, monkeypatch):
    _, processor = demo
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(CalibrationError, match=rf"^rows\.jsonl:2: the chat template of .*demo did not finish within "
                                               rf"{TEMPLATE_SECONDS:g} s"):
        encode_with(processor, monkeypatch, ENDLESS)
    assert TEMPLATE_SECONDS <= 5 and time.monotonic() - start < TEMPLATE_SECONDS + 3
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_template_that_does_not_end_is_stopped_outside_the_main_thread(demo, monkeypatch):
    """Signals reach only the main thread: elsewhere the template renders in a worker thread, stopped at the deadline."""
    _, processor = demo
    monkeypatch.setattr(processor, "chat_template", ENDLESS)
    monkeypatch.setattr("qvlquant.calib.template.TEMPLATE_SECONDS", 1.0)
    raised = []

    def run():
        try:
            encode_sample(processor, SAMPLE, CalibConfig(), "s")
        except CalibrationError as e:
            raised.append(str(e))

    start = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - start < 4
    assert raised and "did not finish within 1 s" in raised[0]
    # the template itself was stopped, not left running in the background
    assert not [t for t in threading.enumerate() if t.name == "qvlquant-chat-template"]


@pytest.mark.parametrize("template,error", [
    ("{% for m in messages %}{{ m.role }", r"TemplateSyntaxError: unexpected '}'"),
    ("{{ raise_exception('boom') }}", r"TemplateError: boom"),
    ("{% include 'other.jinja' %}", r"TypeError: no loader for this environment specified"),
    ("{{ 1 // 0 }}", r"ZeroDivisionError: integer division or modulo by zero"),
])
def test_template_errors_name_the_template(demo, monkeypatch, template, error):
    _, processor = demo
    with pytest.raises(CalibrationError, match=rf"^rows\.jsonl:2: the chat template of .*demo failed: {error}"):
        encode_with(processor, monkeypatch, template)


def test_template_output_is_bounded_by_max_length(demo, monkeypatch):
    _, processor = demo
    flood = "{% for i in range(100000) %}xxxxxxxxxx{% endfor %}"  # 1,000,000 characters
    with pytest.raises(CalibrationError, match=r"the chat template of .*demo wrote 1000000 characters, over 64 per "
                                               r"token of max_length 2048 \(131072\)"):
        encode_with(processor, monkeypatch, flood)


def test_a_real_template_still_renders(demo):
    _, processor = demo
    enc = encode_sample(processor, SAMPLE, CalibConfig(), "s")
    assert int(enc["image_grid_thw"].prod()) > 0
