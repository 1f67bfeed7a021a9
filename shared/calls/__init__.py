"""The deflected call: its jpToken, its link and short link, the Deflected Call Report."""
