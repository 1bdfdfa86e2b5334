"""Chat: rooms, nicknames, private messages, history, flood control; line and NUL framings."""
