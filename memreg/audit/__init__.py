"""``memreg audit``: a pre-flight memorization-risk report for a training set.

Modules, one job each: :mod:`.source` (read any dataset training accepts, in row ranges),
:mod:`.near_dup` (perceptual hashes, faiss search, calibration on planted copies),
:mod:`.captions` (caption normalisation and keys), :mod:`.scoring` (per-caption anisotropy score),
:mod:`.shards` (per-shard work on :mod:`memreg.sharding`: resumable, split across accelerate
processes), :mod:`.merge` (clusters, caption repeats, risk ranking), :mod:`.outputs` (the output
files and the thumbnail page) and :mod:`.report` (the shards merged into the report); the command
is :mod:`memreg.commands.audit`.
"""
