"""Measuring leanft: system facts and memory sampling (``system``), step time and memory (``steps``), the
side-by-side benchmark (``bench``), layer micro-benchmarks (``micro``), paper-scale memory estimates
(``estimate``), parameter counts (``params``) and the tables and plots of it all (``report``)."""
