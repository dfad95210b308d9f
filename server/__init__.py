"""HTTP/WebRTC server and the `emote` command line."""
