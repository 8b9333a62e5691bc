"""Photo collections: index every face of a folder of photos into a library, group the unnamed
faces into people, name them (they become the library gallery's identities), and find them.

Built on `gallery/` (store, search, thresholds), the pipeline's detection and alignment, and
`eval.clustering`; nothing below imports this package.
"""
