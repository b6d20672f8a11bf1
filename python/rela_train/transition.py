"""What happens at the ReLA -> BYOL switch: ``--switch-transition`` (docs/switch.md).

The official code switches hard: from the step after the switch the loss is BYOL's alone, on
BYOL's views, with the target network as the ReLA phase left it (an EMA of the online backbone;
the projector never trained) and the learning rate unchanged. That is ``hard``, which
``--recipe official`` keeps. It costs a 4-5 point kNN drop right after the switch (measured in
docs/switch.md); the other transitions, this project's, each change one thing (they may be joined
with ``+``). Outside the official recipe the default is ``auto``: :data:`MEASURED_BEST` in a run
that switches, the transition that beat ``hard`` by the rule of docs/switch.md ("The default").

* ``blend:STEPS`` -- for STEPS steps both losses are computed on the same views and weighted:
  at the ``i``-th step after the switch (``i = 0 .. STEPS - 1``) the BYOL loss has weight
  ``(i + 1) / (STEPS + 1)`` and the ReLA loss ``1 -`` that, so neither weight is ever 0 or 1
  during the blend; from step ``STEPS`` on, BYOL alone. The weights apply to the raw per-sample
  losses (ReLA's in [0, 2], BYOL's in [0, 8]).
* ``reset-target`` -- at the switch the target backbone and projector become copies of the online
  ones (the ReLA phase keeps the target an EMA of the online backbone, so this removes the lag).
* ``warm-heads:STEPS`` -- for STEPS steps only the projector and predictor train: the backbone
  is frozen (no gradient, no optimizer update, BatchNorm running statistics untouched; features
  still use batch statistics, as in training).
* ``keep-views`` -- the BYOL phase keeps the ReLA phase's augmentation instead of BYOL's.
* ``lr-drop:STEPS`` -- the learning rate is multiplied by ``0.1`` at the switch and re-warmed
  linearly to the schedule's value over STEPS steps: ``0.1 + 0.9 * i / STEPS``.

Everything a transition does is a function of the steps since the switch (the checkpoint's
``switch_step``), so a run stopped mid-transition resumes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LR_DROP",
    "MEASURED_BEST",
    "TRANSITION_KINDS",
    "Transition",
    "parse_transition",
    "resolve_transition",
]

# What ``auto`` (the default outside ``--recipe official``) means in a run that switches: the
# transition that beat ``hard`` in the measured grid by the rule of docs/switch.md ("The
# default").
MEASURED_BEST = "keep-views"

# The learning-rate multiplier lr-drop starts from.
LR_DROP = 0.1
# name -> whether it takes a step count (``name:STEPS``).
TRANSITION_KINDS = {
    "blend": True,
    "reset-target": False,
    "warm-heads": True,
    "keep-views": False,
    "lr-drop": True,
}
_FLAG = "--switch-transition"


@dataclass(frozen=True)
class Transition:
    """A parsed ``--switch-transition``; all zero / False is ``hard``. ``since`` below is the
    number of optimizer steps taken since the switch (0 for the first BYOL-phase step), None
    before the switch (and in runs without ReLA)."""

    blend_steps: int = 0
    reset_target: bool = False
    warm_heads_steps: int = 0
    keep_views: bool = False
    lr_drop_steps: int = 0

    @property
    def hard(self) -> bool:
        return self == Transition()

    def rela_weight(self, since: int | None) -> float:
        """The ReLA loss's weight in a BYOL-phase step (BYOL's is ``1 -`` it); 0 outside a blend."""
        if since is None or since >= self.blend_steps:
            return 0.0
        return 1.0 - (since + 1) / (self.blend_steps + 1)

    def freeze_backbone(self, since: int | None) -> bool:
        """Whether the backbone is frozen in this step (``warm-heads``)."""
        return since is not None and since < self.warm_heads_steps

    def lr_multiplier(self, since: int | None) -> float:
        """The factor on the scheduled learning rate (``lr-drop``); 1 otherwise."""
        if since is None or since >= self.lr_drop_steps:
            return 1.0
        return LR_DROP + (1.0 - LR_DROP) * since / self.lr_drop_steps

    def view_phase(self, phase: str) -> str:
        """Whose augmentation a step of ``phase`` uses (``keep-views``: ReLA's throughout)."""
        return "rela" if self.keep_views else phase


def resolve_transition(text: str, *, rela: bool, switch: str) -> str:
    """``text`` with ``auto`` made concrete: :data:`MEASURED_BEST` in a run that switches from
    ReLA to BYOL (it has a prior and ``--switch`` is not ``never``), ``hard`` in any other run
    (there is no switch to shape). Any other text comes back unchanged."""
    if text != "auto":
        return text
    return MEASURED_BEST if rela and switch != "never" else "hard"


def parse_transition(text: str) -> Transition:
    """``hard`` or ``+``-joined parts (``blend:200``, ``reset-target+warm-heads:300``, ...);
    raises ValueError naming ``--switch-transition``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{_FLAG}: expected auto, hard or a transition, got {text!r}")
    if text == "hard":
        return Transition()
    values: dict[str, int | bool] = {}
    for part in text.split("+"):
        name, colon, count = part.partition(":")
        if name not in TRANSITION_KINDS:
            known = ", ".join(f"{k}:STEPS" if s else k for k, s in TRANSITION_KINDS.items())
            raise ValueError(
                f"{_FLAG}: unknown transition {part!r} in {text!r}; expected auto, hard, {known}"
            )
        if name in values:
            raise ValueError(f"{_FLAG}: {name} given twice in {text!r}")
        if TRANSITION_KINDS[name]:
            steps = int(count) if count.isdigit() else 0
            if steps <= 0:
                raise ValueError(
                    f"{_FLAG}: {name} needs a positive whole number of steps ({name}:STEPS), "
                    f"got {part!r}"
                )
            values[name] = steps
        else:
            if colon:
                raise ValueError(f"{_FLAG}: {name} takes no value, got {part!r}")
            values[name] = True
    return Transition(
        blend_steps=int(values.get("blend", 0)),
        reset_target=bool(values.get("reset-target", False)),
        warm_heads_steps=int(values.get("warm-heads", 0)),
        keep_views=bool(values.get("keep-views", False)),
        lr_drop_steps=int(values.get("lr-drop", 0)),
    )
