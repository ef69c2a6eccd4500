"""``memreg attack``: can someone get the training images out of this model?

Modules, one job each: :mod:`.inputs` (read and check imagefolders and ``clusters.jsonl``; every
user error before weights load), :mod:`.targets` (which images: duplicated first, a sample of the
rest, and the never-seen control), :mod:`.wordings` (perturbed captions), :mod:`.embedding`
(white-box prompt-embedding search on the denoising loss), :mod:`.runner` (the attacks of rising
strength on one target, judged by the copy detector), :mod:`.outputs` (Wilson rates,
``attack.json``, ``attack.html``) and :mod:`.api` (the Python entry); the command, sharded and
resumable on :mod:`memreg.sharding`, is :mod:`memreg.commands.attack`.
"""

from memreg.attack.api import attack_targets, load_pipeline, summarize
from memreg.attack.runner import ATTACKS, AttackSettings, Attacker
from memreg.attack.targets import Target

__all__ = ["ATTACKS", "AttackSettings", "Attacker", "Target", "attack_targets", "load_pipeline", "summarize"]
