"""Published architectures of SD 1.5, SD 2.1 and SDXL base 1.0, offline: their component configs
(``memreg/arch/<family>/``, sources in README.md there) and a builder of random-weight pipelines in
diffusers format (:mod:`memreg.arch.build`), for tests and benchmarks at the real architecture."""

from memreg.arch.build import FAMILIES, ArchError, build_info, build_pipeline_dir, published_config

__all__ = ["FAMILIES", "ArchError", "build_info", "build_pipeline_dir", "published_config"]
