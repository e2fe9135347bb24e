"""Evaluation rosbags: record (record.py), replay through the node or offline
(replay.py), score and report (report.py); bag files via rosbags (io.py)."""
