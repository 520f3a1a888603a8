"""Operator tests: each op against PyTorch through tests/ops/helpers.check_op."""
