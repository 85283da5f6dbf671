# Reference values from R's survey package for tests/test_estimators.py.
# Usage: Rscript rake_survey.R samples.csv margins_x.csv margins_y.csv
# samples.csv has columns x, y, h (and optionally w); margins_*.csv have columns level, Freq.
suppressMessages(library(survey))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
d$x <- factor(d$x)
d$y <- factor(d$y)
mx <- read.csv(args[2]); names(mx) <- c("x", "Freq"); mx$x <- factor(mx$x, levels = levels(d$x))
my <- read.csv(args[3]); names(my) <- c("y", "Freq"); my$y <- factor(my$y, levels = levels(d$y))
des <- if ("w" %in% names(d)) svydesign(id = ~1, weights = ~w, data = d) else
  suppressWarnings(svydesign(id = ~1, data = d))
r <- rake(des, list(~x, ~y), list(mx, my), control = list(maxit = 1000, epsilon = 1e-13))
m <- svymean(~h, r)
cat(sprintf("%.17g %.17g\n", coef(m), SE(m)))
