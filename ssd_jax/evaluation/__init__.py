"""Evaluation: post-processing (NMS), VOC and COCO metrics, the evaluator.

The metrics are host-side numpy; the evaluator drives the predict step over
the test sets and writes the reports.
"""
