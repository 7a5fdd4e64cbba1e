;; Hostile: declares a funcref table of 10,000,000 elements (80 MB of host memory per instance),
;; far past the pool's 100,000-element tables.
;; Expected: refused at deploy, 422 invalid_code, message mentions the table and its limit.
(module
  (memory (export "memory") 1)
  (table 10000000 funcref)
  (func (export "_start")))
