"""The plugin author's kit (conformance suite); filled in below."""
