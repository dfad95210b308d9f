"""MediaPipe Face Mesh landmark index sets (the 478-point mesh with `refine_landmarks=True`).

"Right"/"left" are the subject's: the subject's right eye is on the image's left.
"""
from __future__ import annotations

# Lip contours, each ordered from the subject's right mouth corner (image left) to the left corner.
UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_CORNERS = (61, 291)
INNER_LIP_MID = (13, 14)  # upper and lower inner lip at the centre: the read-back mouth gap

# Eyelid margins, ordered from the outer corner (for the right eye: image left) to the inner corner.
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first
LEFT_IRIS = (473, 474, 475, 476, 477)
RIGHT_BROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
LEFT_BROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
JAW = (234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454)

FOREHEAD = 10
CHIN = 152
NOSE_TIP = 1
NOSE_BOTTOM = 2
NOSE_BRIDGE = 168
SUBNASAL_ROW = (98, 97, 2, 326, 327)  # under the nose: the upper lip's skin starts below these
RIGHT_CHEEK = 234  # the face's widest points, beside the eyes
LEFT_CHEEK = 454
RIGHT_CHEEK_PATCH = (117, 118, 119, 100, 101, 50, 205, 36)  # skin under the eyes, for the skin tone and grain
LEFT_CHEEK_PATCH = (346, 347, 348, 329, 330, 280, 425, 266)

EYE_CRITICAL = RIGHT_EYE_UPPER + RIGHT_EYE_LOWER + LEFT_EYE_UPPER + LEFT_EYE_LOWER
MOUTH_CRITICAL = UPPER_OUTER + LOWER_OUTER
CRITICAL = EYE_CRITICAL + MOUTH_CRITICAL + (CHIN,)  # a face with any of these outside the photo is rejected
