"""Live audio in, paced lip-synced frames out. Knows nothing about HTTP or WebRTC."""
