"""Who reads whom in a story: characters, their identity panels, and each panel's sources.

StoryDiffusion's rule (official app): a character's identity is made by its first
single-character panels, generated together; every other panel reads the identity panels of
the characters it names, and a panel with no character (``[NC]``) reads nothing. Here identity
panels are ordinary panels of the same sampler batch, so they cost nothing extra; they read only
the other identity panels of their own character, so an identity never depends on the rest of
the story.

A character may instead come from the user's images: its identity is then its *reference rows*,
extra rows that the host adds to each model call (the clean reference latents noised to the
current step) and whose output it drops. They read nothing, so their features are those of the
reference alone, and every panel showing that character reads them, its solo panels included.
Reference rows are numbered as panels after the story's: ``panels``, ``panels + 1``, ...

A story may be drawn in part (``drawn``: the panels in the sampler's batch, in story order; the
selected panels plus the identity panels they read). The cast stays the whole story's: the same
identity panels, slots and sources, so every drawn panel is computed as in the whole run.

Identity panels are addressed by *slot*: their position in ``StoryCast.identity_panels``
(character after character, each character's panels or references in order). Plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConsistentAttentionError

MAX_IDENTITY_PANELS = 8


@dataclass(frozen=True)
class StoryCast:
    """The characters of a story and who reads whom.

    names: the characters, in the story's order.
    panel_characters: per panel, the indices (into ``names``) of the characters it shows.
    identity: per character, the indices of its identity panels (reference rows for a character
      made from images).
    references: per character, how many reference rows it has (0: its identity is generated).
    drawn: the story panels in the sampler's batch, in story order; None = every panel.
    """

    names: tuple[str, ...]
    panel_characters: tuple[tuple[int, ...], ...]
    identity: tuple[tuple[int, ...], ...]
    references: tuple[int, ...] = ()
    drawn: tuple[int, ...] | None = None

    @classmethod
    def from_panels(cls, names, panel_characters, identity_panels: int, references=(), drawn=None) -> "StoryCast":
        """Pick each character's first ``identity_panels`` single-character panels, or its
        ``references[c]`` reference rows when it has any.

        A character with fewer solo panels uses those it has; one that never appears alone and
        has no reference has no identity and is an error naming it.
        """
        if not 1 <= identity_panels <= MAX_IDENTITY_PANELS:
            raise ConsistentAttentionError(
                f"identity_panels must lie between 1 and {MAX_IDENTITY_PANELS}, got {identity_panels}."
            )
        names = tuple(names)
        panel_characters = tuple(tuple(dict.fromkeys(chars)) for chars in panel_characters)
        for panel, chars in enumerate(panel_characters):
            bad = [c for c in chars if not 0 <= c < len(names)]
            if bad:
                raise ConsistentAttentionError(f"panel {panel} names characters {bad}, but the story has {len(names)}.")
        references = tuple(references) or (0,) * len(names)
        if len(references) != len(names) or min(references, default=0) < 0:
            raise ConsistentAttentionError(f"references must give a count per character, got {references}.")
        identity = []
        next_reference = len(panel_characters)
        for index, name in enumerate(names):
            if references[index]:
                identity.append(tuple(range(next_reference, next_reference + references[index])))
                next_reference += references[index]
                continue
            solo = solo_panels(panel_characters, index, identity_panels)
            if not solo:
                raise ConsistentAttentionError(
                    f"[{name}] never appears alone in a panel, so it has no identity panel to read from. Add a "
                    f"panel in which [{name}] is the only character (e.g. '[{name}] looks out of the window'); "
                    f"its first {identity_panels} such panels make its identity. Or give it reference images."
                )
            identity.append(solo)
        cast = cls(names, panel_characters, tuple(identity), references, None if drawn is None else tuple(drawn))
        cast.check_drawn()
        return cast

    @property
    def batch(self) -> tuple[int, ...]:
        """The story panels of the sampler's batch, in batch (= story) order."""
        return tuple(range(self.panels)) if self.drawn is None else self.drawn

    def check_drawn(self) -> None:
        """A part of the story must hold every identity panel its panels read."""
        if self.drawn is None:
            return
        if list(self.drawn) != sorted(set(self.drawn)) or not all(0 <= p < self.panels for p in self.drawn):
            raise ConsistentAttentionError(f"drawn panels must be story panels in story order, got {self.drawn}.")
        identity, drawn = self.identity_panels, set(self.drawn)
        missing = sorted({identity[slot] for panel in self.drawn for slot in self.sources(panel)} - drawn
                         - set(self.reference_panels))
        if missing:
            raise ConsistentAttentionError(
                f"The story is drawn in part, without identity panels {[p + 1 for p in missing]} that its panels "
                "read. Set Story Prompts' identity_panels to Consistent Self-Attention's identity_panels, so it "
                "draws the identity panels this node reads."
            )

    @property
    def panels(self) -> int:
        return len(self.panel_characters)

    @property
    def reference_panels(self) -> tuple[int, ...]:
        """The reference rows, numbered after the story's panels, in slot order."""
        return tuple(range(self.panels, self.panels + sum(self.references)))

    @property
    def identity_panels(self) -> tuple[int, ...]:
        """Every identity panel, in slot order."""
        return tuple(panel for panels in self.identity for panel in panels)

    def slot_of(self, panel: int) -> int | None:
        """The identity slot of ``panel``, or None for a panel that is no identity panel."""
        try:
            return self.identity_panels.index(panel)
        except ValueError:
            return None

    def slots(self, character: int) -> tuple[int, ...]:
        start = sum(len(panels) for panels in self.identity[:character])
        return tuple(range(start, start + len(self.identity[character])))

    def sources(self, panel: int) -> tuple[int, ...]:
        """The identity slots ``panel`` reads: an identity panel reads the other identity panels of
        its character; any other panel reads every identity panel of the characters it names; a
        panel without characters reads nothing."""
        if panel >= self.panels:
            return ()  # a reference row: the reference alone
        own = self.slot_of(panel)
        if own is not None:
            character = self.panel_characters[panel][0]
            return tuple(slot for slot in self.slots(character) if slot != own)
        return tuple(slot for character in self.panel_characters[panel] for slot in self.slots(character))

    def call_plan(self, panels_per_call: int) -> tuple[tuple[int, ...], ...]:
        """The panel subsets of one model call, run in this order.

        Only the panels of the batch (``batch``) run. ``panels_per_call`` 0 or at least the batch's
        length: one call over every panel of the batch in story order (the identity panels are in
        that batch). Reference rows are in no call: the host
        runs them before these. Otherwise identity panels first, one
        character's group never split (a group larger than ``panels_per_call`` runs alone), groups
        packed in character order; then the other panels in story order, ``panels_per_call`` at a
        time. Within each of these calls, panels reading as many identity panels sit together, so
        each group of rows is a slice of the call. The identity calls depend only on the identity
        panels and ``panels_per_call``, so the identities do not change when other panels are
        added, removed or edited.
        """
        if panels_per_call < 0:
            raise ConsistentAttentionError(f"panels_per_call must be 0 (as many as fit) or positive, got {panels_per_call}.")
        if panels_per_call == 0 or panels_per_call >= len(self.batch):
            return (self.batch,)
        calls: list[tuple[int, ...]] = []
        current: list[int] = []
        drawn = set(self.batch)
        for group in self.generated_identity:
            group = [panel for panel in group if panel in drawn]  # a part of the story draws whole groups or none
            if not group:
                continue
            if current and len(current) + len(group) > panels_per_call:
                calls.append(tuple(current))
                current = []
            current.extend(group)
        if current:
            calls.append(tuple(current))
        identity = set(self.identity_panels)
        others = [panel for panel in self.batch if panel not in identity]
        calls.extend(tuple(others[i:i + panels_per_call]) for i in range(0, len(others), panels_per_call))
        return tuple(tuple(sorted(call, key=lambda panel: len(self.sources(panel)))) for call in calls)

    @property
    def generated_identity(self) -> tuple[tuple[int, ...], ...]:
        """The identity panels of the characters without references, per character."""
        return tuple(panels for c, panels in enumerate(self.identity) if not self.references[c])

    def largest_call(self, panels_per_call: int) -> int:
        """The most rows one chunk's call holds: a call of the plan, or the reference rows."""
        return max([len(call) for call in self.call_plan(panels_per_call)] + [len(self.reference_panels)])


def solo_panels(panel_characters, character: int, count: int) -> tuple[int, ...]:
    """The first ``count`` panels showing ``character`` alone: its generated identity panels."""
    return tuple(panel for panel, chars in enumerate(panel_characters) if tuple(dict.fromkeys(chars)) == (character,))[:count]


@dataclass(frozen=True)
class BatchCast:
    """Batch mode in ``StoryCall``'s terms: every panel is read, each reads its ``window``
    neighbours (all the others for 0), as ``tokens.neighbour_table`` chooses them."""

    neighbours: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, panels: int, window: int) -> "BatchCast":
        from .tokens import neighbour_table

        return cls(tuple(tuple(row) for row in neighbour_table(panels, window).tolist()))

    @property
    def panels(self) -> int:
        return len(self.neighbours)

    @property
    def identity_panels(self) -> tuple[int, ...]:
        return tuple(range(self.panels))

    reference_panels: tuple[int, ...] = ()

    def slot_of(self, panel: int) -> int:
        return panel

    def sources(self, panel: int) -> tuple[int, ...]:
        return self.neighbours[panel]
