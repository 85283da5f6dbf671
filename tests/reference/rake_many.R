# R survey raking to three margins, one of them joint (list(~stype, ~comp.imp, ~sch.wide + awards)),
# on R's `api` samples, for tests/test_estimators.py. Usage: Rscript rake_many.R out_dir
# Writes out_dir/<sample>.csv (the columns, pw, api00, api99) and prints
# "<sample> <maxit> <variable> <mean> <SE>" for several maxit (sweeps) and at convergence (maxit 0).
suppressMessages(library(survey))
out <- commandArgs(trailingOnly = TRUE)[1]
data(api)
pop.stype <- as.data.frame(xtabs(~stype, apipop))
pop.imp <- as.data.frame(xtabs(~comp.imp, apipop))
pop.wide.awards <- xtabs(~sch.wide + awards, apipop)
margins <- list(~stype, ~comp.imp, ~sch.wide + awards)
targets <- list(pop.stype, pop.imp, pop.wide.awards)
for (sample_name in c("apisrs", "apistrat")) {
  d <- get(sample_name)
  # Independent draws, the design weights kept, no strata or fpc: what databalance assumes.
  des <- svydesign(id = ~1, weights = ~pw, data = d)
  write.csv(data.frame(stype = d$stype, comp.imp = d$comp.imp, sch.wide = d$sch.wide, awards = d$awards,
                       pw = d$pw, api00 = d$api00, api99 = d$api99),
            file.path(out, paste0(sample_name, ".csv")), row.names = FALSE)
  for (maxit in c(1, 2, 3, 5, 0)) {
    ctrl <- if (maxit == 0) list(maxit = 1000, epsilon = 1e-12) else list(maxit = maxit, epsilon = 1e-300)
    r <- suppressWarnings(rake(des, margins, targets, control = ctrl))
    m <- svymean(~api00 + api99, r)
    for (v in c("api00", "api99")) {
      cat(sprintf("%s %d %s %.17g %.17g\n", sample_name, maxit, v, coef(m)[v], SE(m)[v]))
    }
  }
}
cat(sprintf("pop %s\n", paste(c(pop.stype$Freq, pop.imp$Freq, as.vector(t(pop.wide.awards))), collapse = " ")))
