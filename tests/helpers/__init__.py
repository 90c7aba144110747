"""What the tests share: fixtures and helpers that are not tests themselves (no test module imports another)."""
