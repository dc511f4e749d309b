"""The VAR family: Infinity-style next-scale prediction over multi-scale bitwise (BSQ) tokens."""
