"""What the tiny preset needs offline, built into the package: the embedded corpus and the
embedded CORE bundle."""
