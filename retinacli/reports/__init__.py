"""HTML reports of `retina retrieve` and `retina predict` (`--html FILE`): one self-contained file each.

`thumbnails.py` turns items into PNG data URIs (or the reason they cannot be shown); `html.py` builds
the page. numpy + Pillow only, never torch.
"""
