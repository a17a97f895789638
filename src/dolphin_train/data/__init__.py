"""Data stage: files → validated conversations → ChatML token ids and labels → cached, packed rows."""
