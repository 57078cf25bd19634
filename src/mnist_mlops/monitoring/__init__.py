"""Watching the served model: image features (`features`), the inference log that the model
server writes (`inference_log`) and its readers (`log_files`), ground-truth feedback.

May import the ground and `tracking/`; the model server (`serving/`) writes through it.
"""
