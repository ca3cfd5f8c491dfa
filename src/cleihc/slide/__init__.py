"""Whole-slide images: one `Slide` type over OpenSlide, tifffile and Pillow backends.

>>> from cleihc.slide import open_slide
>>> with open_slide("slide.svs") as s:  # doctest: +SKIP
...     res = s.analysis_resolution(0.5)
...     tile = s.read_analysis_rect(res, (0, 0), (1024, 1024))
"""

from cleihc.slide.base import AnalysisResolution, Slide, is_slide, open_slide, slide_stem

__all__ = ["AnalysisResolution", "Slide", "is_slide", "open_slide", "slide_stem"]
