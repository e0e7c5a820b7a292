"""The application layer above the runners: text to video from a checkpoint (t2v), mp4 IO
(video), streamed output (streaming), prompt schedules (prompts), and prompt switching over any
runner (interactive)."""
