"""Reading the course dataset (pairs, labels, what was odd), images, folds, and the files written for users."""
