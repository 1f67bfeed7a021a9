"""Text of a message: phone numbers, GSM/UCS-2 segments, rendering a campaign's text."""
