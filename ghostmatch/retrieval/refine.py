"""Which retrieval refinements a query uses, and the defaults chosen by measurement.

Measured by ``python -m benchmarks.ukbench`` on ukbench-dev (UKBench N-S, tuned on objects
0-62, reported on 63-124 too) and on the caltech101 test photos (class mAP); the README's
Query section gives the figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ghostmatch.errors import GhostmatchError

WHITENINGS = ("none", "training", "collection")
AUGMENTATIONS = ("none", "flip", "multiscale")


@dataclass(frozen=True)
class Refinements:
    """How a query is refined beyond a plain cosine of its descriptor.

    - ``whiten``: PCA whitening with ``shrinkage``, learnt from the model's training photos
      (``training``: the score background its file carries) or from the indexed
      collection (``collection``, kept in the index folder), or ``none``.
    - ``augment``: the query's descriptor averaged with its mirror image's (``flip``), and
      also with its descriptors at 0.8x and 1.3x the input size (``multiscale``).
    - ``dba`` / ``expand``: database-side augmentation and alpha-QE with that many
      neighbours (0: off), weighted by similarity to the power ``alpha``, within the
      ``shortlist`` best results of the plain search.
    - ``rerank``: that many top results checked by local features (0: off); a confirmed
      one gains up to ``rerank_weight`` in score.
    """

    whiten: str = "none"
    shrinkage: float = 0.1
    augment: str = "none"
    dba: int = 2
    expand: int = 2
    alpha: float = 3.0
    rerank: int = 20
    rerank_weight: float = 1.0
    shortlist: int = 200

    def __post_init__(self) -> None:
        if self.whiten not in WHITENINGS:
            raise GhostmatchError(
                f"whiten must be one of {', '.join(WHITENINGS)}, not {self.whiten!r}"
            )
        if self.augment not in AUGMENTATIONS:
            raise GhostmatchError(
                f"augment must be one of {', '.join(AUGMENTATIONS)}, not {self.augment!r}"
            )
        if not 0.0 <= self.shrinkage <= 1.0:
            raise GhostmatchError(f"whitening shrinkage must be in [0, 1], not {self.shrinkage}")
        for name in ("dba", "expand", "rerank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GhostmatchError(f"{name} is a number of results, 0 or more, not {value!r}")
        if (
            isinstance(self.shortlist, bool)
            or not isinstance(self.shortlist, int)
            or self.shortlist < 1
        ):
            raise GhostmatchError(
                f"shortlist must be a whole number of at least 1, not {self.shortlist!r}"
            )
        if not 0.0 <= self.alpha <= 10.0:
            raise GhostmatchError(f"alpha must be in [0, 10], not {self.alpha}")
        if not 0.0 <= self.rerank_weight <= 10.0:
            raise GhostmatchError(f"rerank_weight must be in [0, 10], not {self.rerank_weight}")

    @property
    def plain(self) -> bool:
        """True when nothing refines the plain cosine search."""
        return (
            self.whiten == "none"
            and self.augment == "none"
            and self.dba == 0
            and self.expand == 0
            and self.rerank == 0
        )

    def with_changes(self, **changes: object) -> Refinements:
        return replace(self, **changes)  # type: ignore[arg-type]


# What ``ghostmatch query`` does unless told otherwise: DBA and alpha-QE over the shortlist,
# which gain most of what the descriptor-only refinements gain for a few milliseconds, then
# the best 20 re-ranked by local features, which gains as much again for one network pass
# per result (16 to 24 results gained the same on the tuning objects). The flipped view
# gains nothing beside DBA and alpha-QE.
DEFAULT = Refinements()
# What ``Library.query`` and ``serve`` do unless told otherwise: the same without the
# re-ranking. Programs and servers answer many queries; the re-ranking's network passes
# take a new photo from tens of milliseconds to hundreds, and a server's throughput with
# them. ``refine=DEFAULT`` (``rerank=20`` on the server) ranks as the command does.
QUICK = DEFAULT.with_changes(rerank=0)
PLAIN = Refinements(whiten="none", augment="none", dba=0, expand=0, rerank=0)
