"""The apprentice: a U-Net with demonstration-attention layers that generates a new subject in
context from 3-5 (image, caption) demonstrations, without tuning. (Not built yet: issue 5.)"""
