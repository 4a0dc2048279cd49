"""What every tab of the station shares: user-facing errors, who is signed in, generator choices.

The tabs (:mod:`app.tabs`) and the shell (:mod:`app.shell`) import from here, never from each
other's modules, so the UI has no import cycle either.
"""

from __future__ import annotations

import html
import logging
import uuid
from pathlib import Path

import gradio as gr

from inspector.state import file_sha256

log = logging.getLogger("inspector.station")

FALLBACK_CHOICE = "fallback (weight-free)"


def _error(message: str) -> gr.Error:
    """A user-facing error; escaped, since Gradio renders the message as HTML and it may quote file
    or product names."""
    return gr.Error(html.escape(str(message)))


def _user(request: gr.Request | None) -> str | None:
    """The signed-in user (with login configured); None otherwise (the library then records its
    default actor for registry changes; decisions need a name entered at the station)."""
    name = getattr(request, "username", None) if request is not None else None
    return name or None


def _operator(name: str | None, request: gr.Request | None) -> str:
    """Who decides: the signed-in user, else the name entered at the station; never blank."""
    who = _user(request) or (name or "").strip()
    if not who:
        raise _error("Enter your name in the Operator box (top of the page) before deciding.")
    if len(who) > 128:
        raise _error("Operator name: at most 128 characters.")
    return who


def _upload_label(path: str) -> str:
    """``upload:<original name>#<sha256 prefix>``: two different files named 000.png stay distinct
    in History, and no server path appears."""
    try:
        sha = file_sha256(path)
    except OSError:
        sha = uuid.uuid4().hex
    return f"upload:{Path(path).name}#{sha[:8]}"


def _generator_choices() -> list[str]:
    """The Register/Synthesize generator choices: weight-free, then every models/synth/NAME."""
    from inspector.synth import list_generators

    return [FALLBACK_CHOICE] + [f"diffusion: {p.name}" for p in list_generators()]


def _generator_choice(choice: str | None):
    """Dropdown value -> ``generate_defects``'s ``generator`` (None, a kind, or a model folder)."""
    if not choice or choice in (FALLBACK_CHOICE, "any"):
        return None
    if choice.startswith("diffusion: "):
        from inspector.synth import synth_models_dir

        return str(synth_models_dir() / choice.split(": ", 1)[1])
    return choice


def _score(r: dict) -> str:
    return "-" if r.get("score") is None else f"{float(r['score']):.4g}"


def reason_refusal(verdict: str | None, decision: str, reason: str | None) -> str | None:
    """The sentence shown when a decision lacks a required reason code, else None: the store's
    own rule (:func:`inspector.station.store.check_reason`: accepting a part the detector called NG
    needs a reason), said on screen before anything is recorded."""
    from inspector.station.store import check_reason

    try:
        check_reason(verdict, decision, reason)
    except ValueError as exc:
        return f"Not recorded: {exc}. Choose one under Reason, then accept again."
    return None
