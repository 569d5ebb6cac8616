"""Everything that makes a cohort, made or found for users and benchmarks: the generated H&E-like cohort
(`synthetic`), mosaics of real labelled tiles (`mosaic`, from tile lists: `tiles`), readers of the real labelled
sets the benchmarks use (`crc`: CRCHistoPhenotypes labels and nucleus centres; `pcam`: PatchCamelyon tile lists)
and the classical MIL sets (`classical`). Cohorts write slides with `mrantool.slides.writer`; nothing under slides/,
store/ or models/ imports this package."""
